"""``aejob verify DST [--against SRC]``: check that a dataset holds every input exactly once.

Checks, from the files themselves (nothing is trusted from the manifest):

- ``duplicate_key``: a key in more than one row (across or within data files);
- ``data_without_marker``: a data file with no done-marker (a crashed publish, or a copy);
- ``marker_without_data``: a done-marker whose data file is gone;
- ``row_count_mismatch``: a marker's ``rows``/``ok``/``error`` differ from its data file's;
- ``unreadable_data_file``: a data file that is not readable Parquet with a ``key`` column.

With ``--against SRC`` the source is listed like the job lists it (``sources.list_source``):

- ``missing_unit``: a source unit (a loose file, or a tar/Parquet container) that no marker
  lists, or a loose file whose row is absent;
- ``extra_key``: a row that comes from no unit of the current source (the source file was
  removed, or the row is not from the units its marker lists).

A loose file's unit key is its row key; rows of a container shard belong to its one unit.
Exit code 0 when nothing differs, 1 when something does, 2 when DST cannot be read.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Optional

import typer

KINDS = ("duplicate_key", "data_without_marker", "marker_without_data", "row_count_mismatch",
         "unreadable_data_file", "missing_unit", "extra_key")
EXAMPLES = 10  # keys listed per finding in the report


@dataclass
class Finding:
    kind: str
    detail: str
    count: int = 1
    examples: list[str] = field(default_factory=list)


@dataclass
class Report:
    dst: str
    against: str | None
    data_files: int = 0
    markers: int = 0
    rows: int = 0
    keys: int = 0
    source_units: int | None = None
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(KINDS, 0)
        for f in self.findings:
            out[f.kind] += f.count
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "counts": self.counts()}

    def text(self) -> str:
        lines = [f"aejob verify {self.dst}" + (f" --against {self.against}" if self.against else ""),
                 f"  data files {self.data_files} · markers {self.markers} · rows {self.rows} · "
                 f"distinct keys {self.keys}"
                 + (f" · source units {self.source_units}" if self.source_units is not None else "")]
        for n in self.notes:
            lines.append(f"  note: {n}")
        if self.ok:
            lines.append("  OK: every row once, every data file has its marker"
                         + (", every source unit present" if self.against else ""))
            return "\n".join(lines)
        lines.append(f"  DIFFERENCES ({sum(f.count for f in self.findings)}):")
        for f in self.findings:
            lines.append(f"  - {f.kind}: {f.detail}")
            for e in f.examples[:EXAMPLES]:
                lines.append(f"      {e}")
            if f.count > len(f.examples[:EXAMPLES]) and f.examples:
                lines.append(f"      … {f.count - len(f.examples[:EXAMPLES])} more")
        return "\n".join(lines)


def _read_keys(dst: str, shard: str) -> tuple[list[str], Counter[str]]:
    """(keys, status counts) of one data file, read with plain pyarrow."""
    import pyarrow.parquet as pq

    from pipeline import layout, storage

    fs, root = storage.resolve(dst)
    with fs.open_input_file(f"{root}/{shard}{layout.DATA_SUFFIX}") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if "key" not in names:
            raise ValueError(f"no 'key' column (columns: {', '.join(names)})")
        cols = ["key"] + (["status"] if "status" in names else [])
        t = pf.read(columns=cols)
    keys = [str(k) for k in t.column("key").to_pylist()]
    statuses = Counter(t.column("status").to_pylist()) if "status" in cols else Counter()
    return keys, statuses


def verify(dst: str, against: str | None = None) -> Report:
    from pipeline import layout, storage

    rep = Report(dst=dst, against=against)
    if not storage.exists(dst):
        raise FileNotFoundError(f"DST not found: {dst}")
    markers = layout.read_markers(dst)
    shards = layout.data_files(dst)
    rep.data_files, rep.markers = len(shards), len(markers)
    if storage.exists(storage.join(dst, layout.LEASE)):
        lease = layout.read_json(storage.join(dst, layout.LEASE)) or {}
        rep.notes.append(f"a run holds the lease ({str(lease.get('owner', '?'))[:22]}): "
                         "the dataset may be changing")
    if layout.read_json(storage.join(dst, layout.CONFIG)) is None:
        rep.notes.append(f"no {layout.CONFIG}: not written by aejob, or never started")

    keys_by_shard: dict[str, list[str]] = {}
    occurrences: dict[str, list[str]] = {}
    for shard in shards:
        try:
            keys, statuses = _read_keys(dst, shard)
        except Exception as e:
            rep.findings.append(Finding("unreadable_data_file",
                                        f"{shard}{layout.DATA_SUFFIX}: {type(e).__name__}: {e}"))
            continue
        keys_by_shard[shard] = keys
        rep.rows += len(keys)
        for k in keys:
            occurrences.setdefault(k, []).append(shard)
        m = markers.get(shard)
        if m is None:
            continue
        got = {"rows": len(keys)}
        if statuses:
            got.update(ok=statuses.get("ok", 0), error=statuses.get("error", 0))
        want = {c: int(m.get(c, 0)) for c in got}
        if got != want:
            diff = ", ".join(f"{c} {want[c]} in marker vs {got[c]} in file" for c in got if got[c] != want[c])
            rep.findings.append(Finding("row_count_mismatch", f"{shard}: {diff}"))
    rep.keys = len(occurrences)

    dups = {k: v for k, v in occurrences.items() if len(v) > 1}
    if dups:
        rep.findings.append(Finding(
            "duplicate_key", f"{len(dups)} keys appear more than once "
                             f"({sum(len(v) - 1 for v in dups.values())} extra rows)",
            count=len(dups),
            examples=[f"{k}  in {', '.join(sorted(set(v)))}" for k, v in sorted(dups.items())[:EXAMPLES]]))
    orphans = [s for s in shards if s not in markers]
    if orphans:
        rep.findings.append(Finding(
            "data_without_marker", f"{len(orphans)} data files have no done-marker "
            "(the next run deletes and redoes them; a copy under another name is an error)",
            count=len(orphans), examples=[s + layout.DATA_SUFFIX for s in orphans]))
    lost = sorted(s for s in markers if s not in set(shards))
    if lost:
        rep.findings.append(Finding(
            "marker_without_data", f"{len(lost)} markers whose data file is missing "
            f"({sum(int(markers[s].get('rows', 0)) for s in lost)} rows lost)",
            count=len(lost), examples=[f"{s}{layout.DATA_SUFFIX} ({markers[s].get('rows', '?')} rows)"
                                       for s in lost]))
    if against is not None:
        _check_source(rep, against, markers, keys_by_shard)
    return rep


def _check_source(rep: Report, src: str, markers: dict[str, dict[str, Any]],
                  keys_by_shard: dict[str, list[str]]) -> None:
    from pipeline import layout, sources

    listing = sources.list_source(src)
    units = {u.key: u for u in listing.units}
    rep.source_units = len(units)
    unit_shard = {u: s for s, m in markers.items() for u in m.get("units", [])}
    present = {k for keys in keys_by_shard.values() for k in keys}
    missing = []
    for key, u in units.items():
        shard = unit_shard.get(key)
        if shard is None:
            missing.append(f"{key}  (no marker lists it)")
        elif shard not in keys_by_shard:
            missing.append(f"{key}  (its data file {shard}{layout.DATA_SUFFIX} is missing)")
        elif u.kind == "file" and key not in present:
            missing.append(f"{key}  (marker {shard} lists it, but its row is absent)")
    if missing:
        rep.findings.append(Finding("missing_unit", f"{len(missing)} source units are not in the dataset",
                                    count=len(missing), examples=missing))
    extra = []
    for shard, keys in sorted(keys_by_shard.items()):
        m = markers.get(shard)
        shard_units = list(m.get("units", [])) if m else []
        for k in keys:
            if k in units and units[k].kind == "file":
                continue  # a loose file's row: its key is its unit
            if m is not None and len(shard_units) == 1 and shard_units[0] in units \
                    and units[shard_units[0]].kind != "file":
                continue  # a row of a container that is still in the source
            if m is None:
                why = "data file without marker"
            elif k in shard_units or (len(shard_units) == 1 and shard_units[0] not in units):
                why = "source file removed"
            else:
                why = "not from its marker's units"
            extra.append(f"{k}  in {shard}{layout.DATA_SUFFIX} ({why})")
    if extra:
        rep.findings.append(Finding("extra_key", f"{len(extra)} rows come from no unit of the source",
                                    count=len(extra), examples=extra))


def register(app: typer.Typer) -> None:
    """Add ``aejob verify`` to the typer app (called from jobs/cli.py)."""

    @app.command("verify")
    def verify_cmd(
        dst: Annotated[str, typer.Argument(help="A dataset written by aejob (folder or s3:// prefix).")],
        against: Annotated[Optional[str], typer.Option(  # noqa: UP045 - typer needs Optional
            "--against", help="Also compare with this source: missing units, extra keys.")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    ) -> None:
        """Check DST: duplicate keys, data files without markers and the reverse, marker row
        counts, and with --against SRC missing units and extra keys. Exit 1 on any difference."""
        try:
            rep = verify(dst, against)
        except (FileNotFoundError, OSError) as e:
            typer.echo(f"cannot verify {dst}: {e}", err=True)
            raise typer.Exit(2) from None
        typer.echo(json.dumps(rep.to_dict(), indent=2) if as_json else rep.text())
        raise typer.Exit(0 if rep.ok else 1)
