"""``aejob index | search | dedup | groups``: downstream search over a DST's embeddings.

The index logic lives in ``pipeline/index.py``; this module resolves the embedder that made an
index's vectors (by its ``embedding_model`` id: ``<name>:<sha256 prefix>``), embeds query
images with it and prints results. ``search --json`` writes only JSON to stdout; logs and
progress go to stderr.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer

from pipeline import index as vindex

log = logging.getLogger(__name__)


def parse_model_id(model_id: str) -> tuple[str, str]:
    """``copy-embedder:0123456789ab`` → (name, sha256 prefix)."""
    name, _, rest = model_id.partition(":")
    return name, rest.rsplit(":", 1)[-1] if rest else ""


def _require_embedder(model_id: str) -> tuple[str, str]:
    from models import registry

    name, prefix = parse_model_id(model_id)
    try:
        kind = registry.get(name).kind
    except KeyError:
        kind = "unknown"
    if kind != "embedder" or not prefix:
        raise vindex.SearchIndexError(
            f"the index holds {model_id!r} vectors, made by a {kind} model, not by an embedder checkpoint: query "
            "images cannot be embedded into that space. Re-run the job with the copy-detection embedder "
            "and rebuild the index (`aejob index --rebuild`)")
    return name, prefix


def find_checkpoint(model_id: str, checkpoint: str | None = None) -> Path:
    """The embedder checkpoint whose id is ``model_id``: ``checkpoint`` if given (checked), else
    the shipped one in ``models/weights`` with that sha256 prefix."""
    from models import checkpoint as ck

    name, prefix = _require_embedder(model_id)
    if checkpoint:
        path = ck.resolve(checkpoint)
        sha = ck.sha256_file(path)
        if not sha.startswith(prefix) or ck.read_meta(path).get("name") != name:
            raise vindex.SearchIndexError(f"{checkpoint} (sha256 {sha[:12]}) is not the index's model {model_id}")
        return path
    for side in ck.shipped_sidecars():
        try:
            meta = json.loads(side.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("name") == name and str(meta.get("sha256", "")).startswith(prefix):
            return side.with_suffix(".safetensors")
    raise vindex.SearchIndexError(f"no checkpoint {model_id} among the shipped weights: pass --checkpoint PATH")


def default_threshold(model_id: str, checkpoint: str | None = None, regions: dict[str, Any] | None = None) -> float:
    """The dedup threshold calibrated on training photos and recorded in the checkpoint:
    ``dedup_threshold_regions`` for an index with region vectors of the layout it was calibrated
    for (a pair scores its best window, so unrelated pairs score higher too), else ``dedup_threshold``."""
    from models import checkpoint as ck

    meta = ck.read_meta(find_checkpoint(model_id, checkpoint))
    if regions:
        layout = json.dumps(regions, sort_keys=True)
        if meta.get("dedup_threshold_regions") is not None and \
                (meta.get("metrics") or {}).get("calib_regions_layout") == layout:
            return float(meta["dedup_threshold_regions"])
        log.warning("%s records no dedup threshold for region vectors %s: using the full-vector one, which "
                    "links more unrelated pairs with regions (pass --threshold)", model_id, layout)
    t = meta.get("dedup_threshold")
    if t is None:
        raise vindex.SearchIndexError(f"{model_id} records no dedup threshold: pass --threshold")
    return float(t)


def run_search(dst: str, queries: list[str], k: int, checkpoint: str | None = None,
               threads: int = 0) -> list[dict[str, Any]]:
    """One result object per query, in order; an unreadable or undecodable query gets an error."""
    from models.embedder import EmbedderEngine
    from pipeline import storage
    from pipeline.decode import DecodeError, decode_image

    idx = vindex.load(dst)
    engine = EmbedderEngine(str(find_checkpoint(idx.model, checkpoint)), threads=threads)
    if engine.model_id != idx.model:
        raise vindex.SearchIndexError(f"checkpoint {engine.model_id} does not match the index's {idx.model}")
    out: list[dict[str, Any]] = []
    pixels, slots = [], []
    for q in queries:
        try:
            pixels.append(decode_image(storage.read_bytes(q)).pixels)
            slots.append(len(out))
            out.append({"query": q, "results": []})
        except (DecodeError, OSError) as e:
            out.append({"query": q, "error": str(e) or type(e).__name__, "results": []})
    if pixels:
        hits = idx.search(engine.embed(pixels), k)
        for slot, h in zip(slots, hits):
            out[slot]["results"] = [{"key": idx.keys[r], "score": round(s, 6)} for r, s in h]
    return out


def register(app: typer.Typer) -> None:
    """Add ``index``, ``search``, ``dedup`` and ``groups`` to the top-level command."""

    def fail(e: Exception) -> NoReturn:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)

    @app.command("index")
    def index_cmd(
        dst: Annotated[str, typer.Argument(help="A dataset written by aejob clean or compress (local or s3://).")],
        kind: Annotated[str, typer.Option(help="flat (exact), hnsw (approximate) or auto (flat below "
                                          f"{vindex.AUTO_HNSW_MIN:,} vectors).")] = "auto",
        rebuild: Annotated[bool, typer.Option(help="Start over from DST instead of updating the index.")] = False,
    ) -> None:
        """Build or update DST/_index: adds new rows, replaces changed ones, drops deleted ones."""
        try:
            s = vindex.build(dst, kind=kind, rebuild=rebuild)
        except vindex.SearchIndexError as e:
            fail(e)
        regions = (f" + {s['regions']} regions each" + (f" ({s['rows_without_regions']} rows without)"
                                                        if s["rows_without_regions"] else "")) if s["regions"] else ""
        typer.echo(f"{s['kind']} index of {s['count']} images, {s['vectors']} vectors (full{regions}; "
                   f"{s['embedding_model']}): +{s['added']} added, "
                   f"{s['replaced']} replaced, {s['removed']} removed, {s['skipped_error_rows']} error rows "
                   f"skipped; {s['bytes'] / 1e6:.2f} MB in {s['seconds']:.2f} s")
        if s["rebuilt"]:
            typer.echo(f"rebuilt: {s['rebuilt']}", err=True)

    @app.command("search")
    def search_cmd(
        dst: Annotated[str, typer.Argument(help="An indexed dataset (run aejob index first).")],
        queries: Annotated[list[str], typer.Argument(help="Query images (local paths or s3:// URIs).")],
        k: Annotated[int, typer.Option("-k", "--k", help="Results per query.")] = 10,
        as_json: Annotated[bool, typer.Option("--json", help="Print only JSON on stdout.")] = False,
        checkpoint: Annotated[Optional[str], typer.Option(help="Embedder checkpoint, if not a shipped one.")] = None,
        threads: Annotated[int, typer.Option(help="torch threads (0: default).")] = 0,
    ) -> None:
        """Find the images of DST closest to each query image (copies first)."""
        try:
            results = run_search(dst, queries, k, checkpoint, threads)
        except vindex.SearchIndexError as e:
            fail(e)
        if as_json:
            typer.echo(json.dumps(results))
            return
        from rich.console import Console
        from rich.table import Table

        console = Console()
        for r in results:
            table = Table(title=r["query"], show_header=True)
            table.add_column("rank", justify="right")
            table.add_column("key")
            table.add_column("score", justify="right")
            if "error" in r:
                table.add_row("-", f"[red]error: {r['error']}[/red]", "")
            for i, hit in enumerate(r["results"], 1):
                table.add_row(str(i), hit["key"], f"{hit['score']:.4f}")
            console.print(table)

    @app.command("dedup")
    def dedup_cmd(
        dst: Annotated[str, typer.Argument(help="A dataset written by aejob clean or compress.")],
        threshold: Annotated[Optional[float], typer.Option(
            help="Cosine similarity at or above which two images are copies (default: the embedder's "
            "calibrated one).")] = None,
        neighbours: Annotated[int, typer.Option(help="Neighbours examined per image.")] = 10,
        checkpoint: Annotated[Optional[str], typer.Option(help="Embedder checkpoint, if not a shipped one.")] = None,
    ) -> None:
        """Write near-duplicate groups to DST/_dedup (updates the index first)."""
        try:
            vindex.build(dst)
            idx = vindex.load(dst)
            # rows without region vectors (all of a --no-regions DST) pair by full vectors only
            with_regions = idx.n_regions and (idx.meta.get("rows_without_regions") or 0) < len(idx)
            t = threshold if threshold is not None else default_threshold(
                idx.model, checkpoint, idx.meta.get("regions") if with_regions else None)
            s = vindex.write_dedup(dst, idx, t, neighbours)
        except vindex.SearchIndexError as e:
            fail(e)
        typer.echo(f"{s['groups']} groups of near-duplicates ({s['rows_in_groups']} of {s['rows']} images; "
                   f"{s['removable']} removable, largest group {s['largest_group']}) at threshold {t:.3f} → "
                   f"{dst}/{vindex.DEDUP_DIR}/groups.parquet")

    @app.command("groups")
    def groups_cmd(
        dst: Annotated[str, typer.Argument(help="A dataset written by aejob clean or compress.")],
        k: Annotated[int, typer.Option("-k", "--k", help="Number of groups.")] = 20,
        seed: Annotated[int, typer.Option(help="k-means seed.")] = 0,
    ) -> None:
        """Group DST's images by content (k-means on the embeddings) into DST/_groups."""
        try:
            vindex.build(dst)
            s = vindex.write_groups(dst, vindex.load(dst), k, seed)
        except vindex.SearchIndexError as e:
            fail(e)
        sizes = sorted((g["size"] for g in s["groups"]), reverse=True)
        typer.echo(f"{s['k']} groups over {s['rows']} images (sizes {sizes[:10]}{' …' if len(sizes) > 10 else ''}) → "
                   f"{dst}/{vindex.GROUPS_DIR}/groups.parquet")
