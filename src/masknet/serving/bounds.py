"""A request body's counts checked before it is decoded for real: what an 8 MB body can hold.

Within the body limit a request can hold 3 million array elements, 2 million nested arrays or
600,000 keys. Decoding such a body into Python objects and validating them one by one took 4 to
42 s of event loop (and about 25 bytes of memory per byte of body) before its candidate count
was even looked at. These checks answer first, from scans that materialize almost nothing:

1. the number of candidates (/rank) or rows (/predict): msgspec decodes the body into a struct
   whose one array has `limit + 1` slots of `msgspec.Raw` and refuses a longer array at the
   element that overflows it; every other value is skipped unparsed (0.2 ms for 2 million `{}`);
2. unknown keys: the same scan with structs of the request's keys (top level, candidate,
   features, context, row) that refuse an unknown one at once, values again left as Raw;
3. nested arrays and objects: at most (limit + 1) * (columns + 3) + 16 of them fit a request
   within the limits, counted with `bytes.count` (an upper bound: brackets inside strings count
   too; only above the bound are strings cut out for the exact count).

Each answers only for what it checks: a body it cannot read (malformed JSON, NaN, a lone
surrogate) or whose shape is wrong in another way (a list for an object) passes on to the
careful path, which names the problem, now on a body of bounded size.
"""

from __future__ import annotations

import re
from typing import Sequence

import msgspec

from .features import RequestError, show

UNSET = msgspec.UNSET
_TOO_LONG = "Expected `array` of at most length"  # msgspec's message for an array_like struct's overflow
_UNKNOWN = "Object contains unknown field `"
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)  # a JSON string, escapes included


class BodyBounds:
    """Count checks for one bundle's requests. `top[kind]`: the JSON keys a /rank or /predict body
    may have; `columns`: the raw feature columns; `limit`: most candidates or rows."""

    def __init__(self, columns: Sequence[str], top: dict[str, Sequence[str]], limit: int):
        self.columns = list(columns)
        self.limit = limit
        self.max_containers = (limit + 1) * (len(self.columns) + 3) + 16
        Count = msgspec.defstruct("Count", [(f"e{i}", msgspec.Raw, UNSET) for i in range(limit + 1)],
                                  array_like=True, forbid_unknown_fields=True)
        self._count = {
            "rank": msgspec.json.Decoder(msgspec.defstruct("RankCount", [("candidates", Count, UNSET)])),
            "predict": msgspec.json.Decoder(msgspec.defstruct("PredictCount", [("rows", Count, UNSET)])),
        }
        names = [f"f{k}" for k in range(len(self.columns))]
        Keys = msgspec.defstruct("Keys", [(a, msgspec.Raw, UNSET) for a in names],
                                 rename=dict(zip(names, self.columns)), forbid_unknown_fields=True)
        Cand = msgspec.defstruct("CandidateKeys", [("id", msgspec.Raw, UNSET), ("features", Keys, UNSET)],
                                 forbid_unknown_fields=True)
        typed = {"candidates": list[Cand], "context": Keys, "rows": list[Keys]}
        self._keys = {
            kind: msgspec.json.Decoder(msgspec.defstruct(
                f"{kind}Keys", [(k, typed.get(k, msgspec.Raw), UNSET) for k in keys], forbid_unknown_fields=True))
            for kind, keys in top.items()
        }

    def check(self, body: bytes, kind: str) -> None:
        """RequestError for too many candidates/rows, an unknown key or too many nested arrays and
        objects; None when none of these is wrong (or the body is not JSON that msgspec reads)."""
        self.count(body, kind)
        try:
            self._keys[kind].decode(body)
        except msgspec.ValidationError as exc:
            _unknown_key(str(exc), self.columns)
        except msgspec.DecodeError:
            pass
        except RecursionError:
            raise _too_deep() from None
        self.containers(body, "candidates" if kind == "rank" else "rows")

    def count(self, body: bytes, kind: str) -> None:
        try:
            self._count[kind].decode(body)
        except msgspec.ValidationError as exc:
            if str(exc).startswith(_TOO_LONG):
                what = "candidates" if kind == "rank" else "rows"
                raise RequestError(f"too many {what}: more than {self.limit:,} (the limit is {self.limit:,})") from None
        except msgspec.DecodeError:
            pass
        except RecursionError:  # msgspec's skipping of a Raw value recurses
            raise _too_deep() from None

    def containers(self, body: bytes, what: str) -> None:
        n = body.count(b"[") + body.count(b"{")
        if n > self.max_containers:
            try:  # strings are cut out by a regex that is linear only on valid JSON
                msgspec.json.decode(body, type=msgspec.Raw)
            except msgspec.DecodeError:
                return
            except RecursionError:
                raise _too_deep() from None
            n = _outside_strings(body)
        if n > self.max_containers:
            raise RequestError(
                f"the request holds {n:,} JSON arrays and objects; {self.limit:,} {what} of {len(self.columns)} "
                f"columns need at most {self.max_containers:,} (a feature value is a string, a number or null)"
            )


def _too_deep() -> RequestError:
    return RequestError("malformed JSON: nested too deeply", 400)  # the careful path's words (json.loads)


def _outside_strings(body: bytes) -> int:
    bare = _STRING.sub(b"", body)
    return bare.count(b"[") + bare.count(b"{")


def _unknown_key(message: str, columns: Sequence[str]) -> None:
    """RequestError for msgspec's "unknown field" message, in the careful path's words; anything
    else (a wrong type) is left to the careful path."""
    if not message.startswith(_UNKNOWN):
        return
    rest = message[len(_UNKNOWN):]
    key, sep, path = rest.rpartition("` - at `$")  # the path comes last (a key may contain anything)
    if sep:
        path = path[:-1].lstrip(".")
    else:
        key, path = rest[:-1], ""
    if path == "context" or path.endswith(".features") or path.startswith("rows"):
        raise RequestError(f"{path}: unknown field {show(key)}; the model's fields are: {', '.join(columns)}")
    # the top level or a candidate: pydantic's words, as the careful path says them
    raise RequestError(f"{path + '.' if path else ''}{short(key)}: Extra inputs are not permitted")


def short(key: str, limit: int = 60) -> str:
    """A key for a message: at most `limit` characters of it, with its length if cut."""
    return key if len(key) <= limit else f"{key[:limit]}... ({len(key):,} characters)"
