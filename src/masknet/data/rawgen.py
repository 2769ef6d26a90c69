"""Generate raw input files in the formats of the paper's datasets (for tests and benchmarks).

Not real data: values are drawn so the files exercise every parsing path (missing values,
negative integers, heavy-tailed counts, hashed hex categories, Zipf-distributed
categories with long tails), and labels depend on a few fields so a model can learn
something. Generation is chunked: any number of rows is written in bounded memory.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from .formats import MALWARE_COLUMNS

CHUNK = 1 << 16


def _hex_pool(rng: np.random.Generator, n: int) -> pa.Array:
    vals = rng.integers(0, 2**32, size=n, dtype=np.uint64)
    digits = (vals[:, None] >> (np.arange(7, -1, -1, dtype=np.uint64) * np.uint64(4))) & np.uint64(15)
    chars = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)[digits.astype(np.int64)]
    return pa.array(np.ascontiguousarray(chars).view("S8").ravel()).cast(pa.string())


def _zipf_idx(rng: np.random.Generator, card: int, rows: int, s: float) -> np.ndarray:
    # inverse-CDF sampling from a truncated power law over 0..card-1 (fast, no table per call)
    u = rng.random(rows)
    if abs(s - 1.0) < 1e-9:
        s = 1.0001
    a = 1.0 - s
    x = ((card ** a - 1.0) * u + 1.0) ** (1.0 / a)
    return np.minimum(x.astype(np.int64) - 1, card - 1).clip(0)


def _open(path: Path, gz: bool):
    return gzip.open(path, "wb", compresslevel=1) if gz else open(path, "wb")


CRITEO_CARDS = [
    1_400, 550, 300_000, 200_000, 300, 24, 12_000, 600, 3, 90_000, 5_000, 250_000, 3_100,
    27, 11_000, 180_000, 10, 4_500, 2_000, 4, 220_000, 17, 15, 60_000, 80, 45_000,
]


def write_criteo(
    path: str | Path,
    rows: int,
    seed: int = 0,
    header: bool = False,
    sep: str = "\t",
    gz: Optional[bool] = None,
    list_tokens: int = 0,
) -> Path:
    """Criteo DAC lines: label, I1..I13 (ints, missing, I2 negative), C1..C26 (8-hex, missing).

    `header=True, sep=","` writes the CSV-with-header variant (numbers as floats, like
    `criteo-sample-200`). `list_tokens=N` appends a 41st column `tags`: N values per row joined
    by "|" (a multi-valued field; drawn from their own random stream, so the other columns are
    the same as without it).
    """
    path = Path(path)
    gz = path.suffix == ".gz" if gz is None else gz
    rng = np.random.default_rng(seed)
    pools = [_hex_pool(rng, c) for c in CRITEO_CARDS]
    w_cat = [rng.normal(0, 0.6, size=min(c, 64)) for c in CRITEO_CARDS]
    names = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)] + (["tags"] if list_tokens else [])
    tag_rng = np.random.default_rng([seed, 0x7A])
    tag_pool = pa.array([f"t{i:x}" for i in range(100_000)]) if list_tokens else None
    with _open(path, gz) as fh:
        if header:
            fh.write((sep.join(names) + "\n").encode())
        for start in range(0, rows, CHUNK):
            n = min(CHUNK, rows - start)
            logit = np.full(n, -2.4)
            cols: list[pa.Array] = []
            ints = []
            for i in range(13):
                v = np.floor(rng.lognormal(1.0 + 0.2 * i, 1.5, n)).astype(np.int64)
                if i == 1:
                    v = np.where(rng.random(n) < 0.1, -rng.integers(1, 4, n), v)
                miss = rng.random(n) < (0.05 + 0.03 * i)
                logit += np.where(miss, 0.0, 0.15 * np.log1p(np.abs(v)) * (1 if i % 2 else -1) / 3)
                arr = pa.array(v.astype(np.float64) if header else v, mask=miss)
                ints.append(pc_cast_str(arr))
            for j, c in enumerate(CRITEO_CARDS):
                idx = _zipf_idx(rng, c, n, 1.1 + 0.02 * (j % 5))
                logit += w_cat[j][np.minimum(idx, len(w_cat[j]) - 1)] * (idx < len(w_cat[j]))
                miss = rng.random(n) < (0.3 if j % 7 == 3 else 0.02)
                arr = pools[j].take(pa.array(idx))
                cols.append(pc.if_else(pa.array(miss), pa.scalar(None, pa.string()), arr))
            y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
            if list_tokens:
                flat = tag_pool.take(pa.array(_zipf_idx(tag_rng, len(tag_pool), n * list_tokens, 1.05)))
                offsets = pa.array(np.arange(n + 1, dtype=np.int32) * list_tokens)
                cols.append(pc.binary_join(pa.ListArray.from_arrays(offsets, flat), "|"))
            table = pa.table([pa.array(y).cast(pa.string())] + ints + cols, names=names)
            pacsv.write_csv(
                table,
                fh,
                write_options=pacsv.WriteOptions(include_header=False, delimiter=sep, quoting_style="none"),
            )
    return path


def pc_cast_str(arr: pa.Array) -> pa.Array:
    return arr.cast(pa.string())


def _write_table(fh, table: pa.Table, header: bool) -> None:
    pacsv.write_csv(table, fh, write_options=pacsv.WriteOptions(include_header=header, quoting_style="none"))


def write_avazu(path: str | Path, rows: int, seed: int = 0, gz: Optional[bool] = None, start_hour: int = 14102100) -> Path:
    """Avazu `train` CSV: 24 columns with header, rows in time order over 10 days from `start_hour`."""
    from .formats import AVAZU_COLUMNS

    path = Path(path)
    gz = path.suffix == ".gz" if gz is None else gz
    rng = np.random.default_rng(seed)
    cards = {c: 5 + 37 * (i % 9) ** 2 for i, c in enumerate(AVAZU_COLUMNS[3:])}
    pools = {c: _hex_pool(rng, k) for c, k in cards.items()}
    weights = {c: rng.normal(0, 0.5, size=k) for c, k in cards.items()}
    base = np.datetime64(f"20{start_hour // 1000000:02d}-{start_hour // 10000 % 100:02d}-{start_hour // 100 % 100:02d}T00")
    with _open(path, gz) as fh:
        for start in range(0, rows, CHUNK):
            n = min(CHUNK, rows - start)
            hours = base + (np.arange(start, start + n) * 240 // max(rows, 1)).astype("timedelta64[h]")
            hs = np.datetime_as_string(hours, unit="h")  # 2014-10-21T00 -> 14102100
            hour = np.array([h[2:4] + h[5:7] + h[8:10] + h[11:13] for h in hs.tolist()])
            logit = np.full(n, -1.6)
            cols = {
                "id": pa.array(rng.integers(0, 2**63, n, dtype=np.int64)).cast(pa.string()),
                "hour": pa.array(hour),
            }
            for c, k in cards.items():
                idx = _zipf_idx(rng, k, n, 1.2)
                logit += weights[c][idx] * 0.3
                if c in ("C1", "banner_pos", "device_type", "device_conn_type") or c.startswith("C1") or c.startswith("C2"):
                    cols[c] = pa.array(idx + 1000 * (c == "C1")).cast(pa.string())
                else:
                    cols[c] = pools[c].take(pa.array(idx))
            y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
            cols["click"] = pa.array(y).cast(pa.string())
            table = pa.table([cols[c] for c in AVAZU_COLUMNS], names=AVAZU_COLUMNS)
            if start == 0:
                fh.write((",".join(AVAZU_COLUMNS) + "\n").encode())
            _write_table(fh, table, header=False)
    return path


# Missing rates of the Malware columns that are often empty (from the Kaggle data's profile).
MALWARE_MISSING = {
    "PuaMode": 0.9997, "Census_ProcessorClass": 0.996, "DefaultBrowsersIdentifier": 0.95,
    "Census_IsFlightingInternal": 0.83, "Census_InternalBatteryType": 0.71, "Census_ThresholdOptIn": 0.64,
    "Census_IsWIMBootEnabled": 0.64, "SmartScreen": 0.36, "OrganizationIdentifier": 0.31,
    "SMode": 0.06, "CityIdentifier": 0.04, "Wdft_IsGamer": 0.03, "Wdft_RegionIdentifier": 0.03,
    "Census_InternalBatteryNumberOfCharges": 0.03, "Census_FirmwareManufacturerIdentifier": 0.02,
    "Census_IsFlightsDisabled": 0.02, "Census_FirmwareVersionIdentifier": 0.02,
    "Census_OEMModelIdentifier": 0.01, "Census_OEMNameIdentifier": 0.01, "Firewall": 0.01,
    "Census_TotalPhysicalRAM": 0.009, "Census_IsAlwaysOnAlwaysConnectedCapable": 0.008,
    "Census_PrimaryDiskTotalCapacity": 0.006, "Census_SystemVolumeTotalCapacity": 0.006,
    "Census_ProcessorCoreCount": 0.005, "Census_InternalPrimaryDiagonalDisplaySizeInInches": 0.005,
    "Census_InternalPrimaryDisplayResolutionHorizontal": 0.005, "Census_InternalPrimaryDisplayResolutionVertical": 0.005,
    "AVProductStatesIdentifier": 0.004, "AVProductsInstalled": 0.004, "AVProductsEnabled": 0.004,
    "IsProtected": 0.004, "RtpStateBitfield": 0.004, "Census_IsVirtualDevice": 0.002,
    "UacLuaenable": 0.001, "GeoNameIdentifier": 0.0001,
}
_MALWARE_STRINGS = {
    "ProductName": ["win8defender", "mse", "mseprerelease", "windowsintune", "fep", "scep"],
    "Platform": ["windows10", "windows8", "windows7", "windows2016"],
    "Processor": ["x64", "x86", "arm64"],
    "OsVer": ["10.0.0.0", "6.3.0.0", "6.1.1.0", "10.0.1.44"],
    "OsPlatformSubRelease": ["rs4", "rs3", "rs2", "rs1", "th2", "th1", "windows8.1", "windows7"],
    "SkuEdition": ["Home", "Pro", "Invalid", "Education", "Enterprise", "Enterprise LTSB", "Cloud", "Server"],
    "SmartScreen": ["RequireAdmin", "ExistsNotSet", "Off", "Warn", "Prompt", "Block", "off", "On", "&#x02;"],
    "Census_MDC2FormFactor": ["Notebook", "Desktop", "Convertible", "Detachable", "AllInOne", "SmallTablet"],
    "Census_DeviceFamily": ["Windows.Desktop", "Windows.Server", "Windows"],
    "Census_ProcessorClass": ["low", "mid", "high"],
    "Census_PrimaryDiskTypeName": ["HDD", "SSD", "UNKNOWN", "Unspecified"],
    "Census_ChassisTypeName": ["Notebook", "Desktop", "Laptop", "Portable", "AllinOne", "MiniTower"],
    "Census_PowerPlatformRoleName": ["Mobile", "Desktop", "Slate", "Workstation", "SOHOServer"],
    "Census_InternalBatteryType": ["lion", "li-i", "#", "lip", "liio"],
    "Census_OSArchitecture": ["amd64", "x86", "arm64"],
    "Census_OSBranch": ["rs4_release", "rs3_release", "rs3_release_svc_escrow", "rs2_release", "rs1_release"],
    "Census_OSEdition": ["Core", "Professional", "CoreCountrySpecific", "CoreSingleLanguage", "Education"],
    "Census_OSSkuName": ["CORE", "PROFESSIONAL", "CORE_SINGLELANGUAGE", "CORE_COUNTRYSPECIFIC", "EDUCATION"],
    "Census_OSInstallTypeName": ["UUPUpgrade", "IBSClean", "Update", "Upgrade", "Other", "Reset", "Refresh"],
    "Census_OSWUAutoUpdateOptionsName": ["FullAuto", "UNKNOWN", "Notify", "AutoInstallAndRebootAtMaintenanceTime"],
    "Census_GenuineStateName": ["IS_GENUINE", "INVALID_LICENSE", "OFFLINE", "UNKNOWN"],
    "Census_ActivationChannel": ["Retail", "OEM:DM", "Volume:GVLK", "OEM:NONSLP", "Volume:MAK"],
    "Census_FlightRing": ["Retail", "NOT_SET", "Unknown", "WIS", "WIF", "RP", "Disabled"],
}
_MALWARE_NUMERIC_GEN = {  # (log-mean, log-sd) of the raw value
    "Census_ProcessorCoreCount": (1.3, 0.5),
    "Census_PrimaryDiskTotalCapacity": (12.9, 0.6),
    "Census_SystemVolumeTotalCapacity": (12.0, 0.8),
    "Census_TotalPhysicalRAM": (8.5, 0.5),
    "Census_InternalPrimaryDiagonalDisplaySizeInInches": (2.75, 0.15),
    "Census_InternalPrimaryDisplayResolutionHorizontal": (7.3, 0.2),
    "Census_InternalPrimaryDisplayResolutionVertical": (6.8, 0.2),
    "Census_InternalBatteryNumberOfCharges": (3.0, 3.0),
}


def write_malware(path: str | Path, rows: int, seed: int = 0, gz: Optional[bool] = None) -> Path:
    """Microsoft Malware `train.csv`: the exact 83 columns, realistic missing values and value shapes."""
    path = Path(path)
    gz = path.suffix == ".gz" if gz is None else gz
    rng = np.random.default_rng(seed)
    weights = {c: rng.normal(0, 0.4, size=64) for c in MALWARE_COLUMNS}
    with _open(path, gz) as fh:
        for start in range(0, rows, CHUNK):
            n = min(CHUNK, rows - start)
            logit = np.zeros(n)
            cols = {}
            for c in MALWARE_COLUMNS[:-1]:
                miss = rng.random(n) < MALWARE_MISSING.get(c, 0.0)
                if c == "MachineIdentifier":
                    a = rng.integers(0, 2**63, n, dtype=np.int64)
                    arr = pa.array([f"{v:032x}" for v in a.tolist()])
                    miss[:] = False
                elif c in _MALWARE_NUMERIC_GEN:
                    mu, sd = _MALWARE_NUMERIC_GEN[c]
                    v = np.round(rng.lognormal(mu, sd, n), 1 if "Inches" in c else 0)
                    logit += 0.2 * (np.log1p(v) - mu) * (1 if len(c) % 2 else -1)
                    arr = pa.array(v).cast(pa.string())
                elif c in _MALWARE_STRINGS:
                    pool = _MALWARE_STRINGS[c]
                    idx = _zipf_idx(rng, len(pool), n, 1.5)
                    logit += weights[c][idx]
                    arr = pa.array(pool).take(pa.array(idx))
                elif c.endswith("Version") or c == "OsBuildLab":
                    idx = _zipf_idx(rng, 400, n, 1.2)
                    logit += weights[c][np.minimum(idx, 63)] * (idx < 64)
                    arr = pa.array([f"1.{i // 40}.{1000 + i}.{i % 7}" for i in range(400)]).take(pa.array(idx))
                elif c.startswith("Is") or c.startswith("Census_Is") or c in ("HasTpm", "Firewall", "SMode", "Wdft_IsGamer", "AutoSampleOptIn", "UacLuaenable", "Census_HasOpticalDiskDrive", "Census_ThresholdOptIn"):
                    idx = (rng.random(n) < 0.3).astype(np.int64)
                    logit += weights[c][idx]
                    arr = pa.array(idx).cast(pa.string())
                else:  # identifiers, written as floats like the Kaggle file (pandas NaN-able ints)
                    card = 10 + (len(c) * 997) % 5000
                    idx = _zipf_idx(rng, card, n, 1.1)
                    logit += weights[c][np.minimum(idx, 63)] * (idx < 64)
                    arr = pa.array((idx + 1).astype(np.float64)).cast(pa.string())
                    arr = pc.binary_join_element_wise(arr, pa.scalar(".0"), "") if not str(arr[0]).endswith(".0") else arr
                cols[c] = pc.if_else(pa.array(miss), pa.scalar(None, pa.string()), arr)
            logit = 0.5 * (logit - logit.mean())  # about 50% positive, like the Kaggle data
            y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
            cols["HasDetections"] = pa.array(y).cast(pa.string())
            table = pa.table([cols[c] for c in MALWARE_COLUMNS], names=MALWARE_COLUMNS)
            if start == 0:
                fh.write((",".join(MALWARE_COLUMNS) + "\n").encode())
            _write_table(fh, table, header=False)
    return path
