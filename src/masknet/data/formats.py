"""The built-in raw formats, each declared once: how to read it, its fields and its defaults.

A `Format` holds everything `masknet prepare --format NAME`, `masknet predict` and the CLI's help
need: the reader settings (file type, delimiter, header, columns, quoting), the label, the time
column (`--split time`), the row id column (written beside each score by `masknet predict`), the
default minimum count and where that default comes from, and the fields. Adding a format is one
`register_format(Format(...))` here (plus its test in tests/data/test_data_formats.py); anything else
is described by a schema file (`schema:FILE`, schema.load_schema_file).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ..errors import UserError
from .schema import SCHEMA_MIN_COUNT, SMALL_FILE_TRAIN_ROWS, DatasetSpec, FieldSpec, load_schema_file


@dataclass(frozen=True)
class Format:
    name: str
    summary: str  # one line for `masknet prepare --help`
    fields: Callable[[int], list[FieldSpec]]  # min count -> the format's fields
    min_count: int  # default: categories seen fewer times in train become out-of-vocabulary
    min_count_source: str  # where that default comes from
    file_type: str = "csv"
    delimiter: str = ","
    header: bool = True
    columns: Optional[tuple[str, ...]] = None  # every column in order (formats without a header)
    quoting: bool = True
    label: str = "label"
    label_kind: str = "01"
    time: Optional[str] = None  # the column that orders rows for --split time (None: file order)
    time_kind: str = "number"
    id_column: Optional[str] = None  # the row id `masknet predict` writes beside each score
    # the min count on a small file (fewer than schema.SMALL_FILE_TRAIN_ROWS train rows), applied by
    # prepare once it has counted them (DatasetSpec.for_train_rows); None: `min_count` at any size
    small_file_min_count: Optional[int] = None

    def spec(self, min_count: Optional[int] = None) -> DatasetSpec:
        """A fresh DatasetSpec of this format (every field at `min_count`, default the format's)."""
        mc = self.min_count if min_count is None else min_count
        return DatasetSpec(
            self.name, self.file_type, self.delimiter, header=self.header,
            columns=list(self.columns) if self.columns else None, quoting=self.quoting, label=self.label,
            label_kind=self.label_kind, fields=self.fields(mc), time=self.time, time_kind=self.time_kind,
            small_file_min_count=self.small_file_min_count if min_count is None else None,
        )


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    if fmt.name in FORMATS or fmt.name.startswith("schema:"):
        raise ValueError(f"format {fmt.name!r} is already registered or reserved")
    FORMATS[fmt.name] = fmt
    return fmt


def builtin_spec(name: str) -> DatasetSpec:
    fmt = FORMATS.get(name)
    if fmt is None:
        raise UserError(f"--format {name}: unknown format; choose {', '.join(FORMATS)} or schema:FILE")
    return fmt.spec()


def spec_for_format(fmt: str) -> DatasetSpec:
    """A built-in format's name, or `schema:FILE`."""
    if fmt.startswith("schema:"):
        return load_schema_file(fmt[len("schema:"):])
    return builtin_spec(fmt)


def id_column(fmt: str) -> Optional[str]:
    """The row id column of a built-in format (None for others and schema files)."""
    found = FORMATS.get(fmt)
    return found.id_column if found else None


def format_help() -> str:
    """The `--format` help: every built-in format, then schema files."""
    return ", ".join(f"{f.name} ({f.summary})" for f in FORMATS.values()) + ", or schema:FILE (a YAML schema for any CSV or Parquet)"


def min_count_help() -> str:
    return ", ".join(f"{f.name} {f.min_count}" + (f" ({f.small_file_min_count} below {SMALL_FILE_TRAIN_ROWS:,} train rows)" if f.small_file_min_count else "")
                     for f in FORMATS.values()) + f", schema files {SCHEMA_MIN_COUNT} or their min_count"


# ---------------------------------------------------------------------------
# The built-in formats

CRITEO_COLUMNS = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]

AVAZU_COLUMNS = [
    "id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
    "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type",
    "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
]

MALWARE_COLUMNS = [
    "MachineIdentifier", "ProductName", "EngineVersion", "AppVersion", "AvSigVersion", "IsBeta",
    "RtpStateBitfield", "IsSxsPassiveMode", "DefaultBrowsersIdentifier", "AVProductStatesIdentifier",
    "AVProductsInstalled", "AVProductsEnabled", "HasTpm", "CountryIdentifier", "CityIdentifier",
    "OrganizationIdentifier", "GeoNameIdentifier", "LocaleEnglishNameIdentifier", "Platform", "Processor",
    "OsVer", "OsBuild", "OsSuite", "OsPlatformSubRelease", "OsBuildLab", "SkuEdition", "IsProtected",
    "AutoSampleOptIn", "PuaMode", "SMode", "IeVerIdentifier", "SmartScreen", "Firewall", "UacLuaenable",
    "Census_MDC2FormFactor", "Census_DeviceFamily", "Census_OEMNameIdentifier", "Census_OEMModelIdentifier",
    "Census_ProcessorCoreCount", "Census_ProcessorManufacturerIdentifier", "Census_ProcessorModelIdentifier",
    "Census_ProcessorClass", "Census_PrimaryDiskTotalCapacity", "Census_PrimaryDiskTypeName",
    "Census_SystemVolumeTotalCapacity", "Census_HasOpticalDiskDrive", "Census_TotalPhysicalRAM",
    "Census_ChassisTypeName", "Census_InternalPrimaryDiagonalDisplaySizeInInches",
    "Census_InternalPrimaryDisplayResolutionHorizontal", "Census_InternalPrimaryDisplayResolutionVertical",
    "Census_PowerPlatformRoleName", "Census_InternalBatteryType", "Census_InternalBatteryNumberOfCharges",
    "Census_OSVersion", "Census_OSArchitecture", "Census_OSBranch", "Census_OSBuildNumber",
    "Census_OSBuildRevision", "Census_OSEdition", "Census_OSSkuName", "Census_OSInstallTypeName",
    "Census_OSInstallLanguageIdentifier", "Census_OSUILocaleIdentifier", "Census_OSWUAutoUpdateOptionsName",
    "Census_IsPortableOperatingSystem", "Census_GenuineStateName", "Census_ActivationChannel",
    "Census_IsFlightingInternal", "Census_IsFlightsDisabled", "Census_FlightRing", "Census_ThresholdOptIn",
    "Census_FirmwareManufacturerIdentifier", "Census_FirmwareVersionIdentifier", "Census_IsSecureBootEnabled",
    "Census_IsWIMBootEnabled", "Census_IsVirtualDevice", "Census_IsTouchEnabled", "Census_IsPenCapable",
    "Census_IsAlwaysOnAlwaysConnectedCapable", "Wdft_IsGamer", "Wdft_RegionIdentifier", "HasDetections",
]
# The true numerics of the Malware data (sizes and counts); every other feature is categorical.
MALWARE_NUMERIC = [
    "Census_ProcessorCoreCount", "Census_PrimaryDiskTotalCapacity", "Census_SystemVolumeTotalCapacity",
    "Census_TotalPhysicalRAM", "Census_InternalPrimaryDiagonalDisplaySizeInInches",
    "Census_InternalPrimaryDisplayResolutionHorizontal", "Census_InternalPrimaryDisplayResolutionVertical",
    "Census_InternalBatteryNumberOfCharges",
]

FRAPPE_FIELDS = ["user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather", "country", "city"]


def _criteo_fields(mc: int) -> list[FieldSpec]:
    return [FieldSpec(f"I{i}", f"I{i}", "log_bucket", mc) for i in range(1, 14)] + [
        FieldSpec(f"C{i}", f"C{i}", "category", mc) for i in range(1, 27)
    ]


def _avazu_fields(mc: int) -> list[FieldSpec]:
    return [
        FieldSpec("hour_of_day", "hour", "hour_of_day", mc),
        FieldSpec("weekday", "hour", "weekday", mc),
        FieldSpec("weekend", "hour", "weekend", mc),
    ] + [FieldSpec(c, c, "category", mc) for c in AVAZU_COLUMNS[3:]]


def _malware_fields(mc: int) -> list[FieldSpec]:
    return [FieldSpec(c, c, "log_bucket" if c in MALWARE_NUMERIC else "category", mc) for c in MALWARE_COLUMNS[1:-1]]


def _frappe_fields(mc: int) -> list[FieldSpec]:
    return [FieldSpec(f, f, "libfm", mc) for f in FRAPPE_FIELDS]


_CRITEO_MIN_COUNT = "FuxiCTR/BARS Criteo_x4_001, the usual choice since the DeepFM/AutoInt papers"
# Small Criteo files (issue 16; docs/model.md "Training defaults", docs/data.md): on a Criteo-like log of a
# few thousand rows most ids seen 10 times are noise to a deep model, and min count 30 was worth
# +0.02 test AUC to SerMaskNet on the built-in 10k rows (selection sets only). Large files keep the
# BARS protocol's 10; the rule was measured up to 96k train rows, so it stops at 100k. Not for Frappe,
# whose user and item ids are the signal (min count 5 already cost SerMaskNet 0.04 on Frappe-8k).
_CRITEO_SMALL_FILE_MIN_COUNT = 30
register_format(Format(
    "criteo", "train.txt, tab-separated", _criteo_fields, 10, _CRITEO_MIN_COUNT,
    delimiter="\t", header=False, columns=tuple(CRITEO_COLUMNS), quoting=False,
    small_file_min_count=_CRITEO_SMALL_FILE_MIN_COUNT,
))
register_format(Format("criteo-csv", "CSV with header", _criteo_fields, 10, _CRITEO_MIN_COUNT,
                       small_file_min_count=_CRITEO_SMALL_FILE_MIN_COUNT))
register_format(Format(
    "avazu", "CSV with header", _avazu_fields, 2, "FuxiCTR/BARS Avazu_x4_001",
    label="click", time="hour", time_kind="avazu_hour", id_column="id",
))
register_format(Format(
    "malware", "Microsoft Malware CSV", _malware_fields, 10, "no standard in the CTR literature; treated like Criteo",
    label="HasDetections", id_column="MachineIdentifier",
))
register_format(Format(
    "frappe", "libFM", _frappe_fields, 1, "FuxiCTR/BARS Frappe_x1: small and clean, every id kept",
    file_type="libfm", delimiter=" ", header=False, columns=("label", *FRAPPE_FIELDS), quoting=False, label_kind="pm1",
))
