"""Registry benchmark: cost from 1 to 1,000,000 versions, deep (few names) and wide (many).

    python bench/registry_bench.py [--real 10000] [--deep 100000] [--wide 100000x10]
        [--deep-many 100x10000] [--gc-blobs 10000] [--out bench/RESULTS.md]

Shapes:
  - one name: `--real` versions through `Registry.publish` (validation, blob copies with
    fsync, one BEGIN IMMEDIATE transaction each), then rows inserted in bulk up to `--deep`,
    then real publishes again: publish latency at 100, at `--real` and at `--deep` versions;
  - wide (`--wide` names x versions) and deep (`--deep-many`), each 1,000,000 rows by default,
    inserted in bulk straight into the registry's own schema (versions, 3 files each, tags,
    the latest-version search index), for the read paths: resolve of every selector kind,
    a page of 50 of list / list --task / list --all / search / show --versions, at the
    first page and deep into the listing;
  - gc over `--gc-blobs` unreferenced blobs while a publisher publishes: how long the
    publisher waits.
Times are CPU time of this process (time.process_time), median and p99; the load average
is printed beside them because the machine is shared.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deltahub import artifact as af  # noqa: E402
from deltahub.registry import Registry  # noqa: E402

PAGE = 50


def make_artifact(path: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    path.mkdir(parents=True)
    save_file(
        {
            f"{prefix}.lora_A.weight": torch.randn(8, 64, generator=g),
            f"{prefix}.lora_B.weight": torch.randn(64, 8, generator=g),
        },
        str(path / af.WEIGHTS_FILE),
    )
    (path / af.CONFIG_FILE).write_text(
        json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]})
    )
    return path


def cpu_ms(fn: Callable[[], object], repeat: int) -> dict[str, float]:
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        times.append((time.process_time() - t0) * 1e3)
    times.sort()
    return {
        "median": statistics.median(times),
        "p99": times[min(len(times) - 1, int(0.99 * len(times)))],
        "n": repeat,
    }


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def description(i: int) -> str:
    return f"classifier for reviews batch {i}"


# ---------------------------------------------------------------------- bulk rows


def bulk_fill(reg: Registry, names: list[str], per_name: int, first_seq: int = 1) -> None:
    """Insert `per_name` versions of each name straight into the schema, as publish would leave them.

    Rows reuse the blobs of one real version (its files) with a digest of their own; the
    newest version of each name gets `latest` (row flag, tag, search index), the first one `prod`.
    """
    template = reg.db.execute("select id from versions order by id limit 1").fetchone()
    files = dict(
        reg.db.execute("select filename, blob from files where version_id = ?", [template[0]]).fetchall()
    )
    sizes = dict(
        reg.db.execute("select filename, size from files where version_id = ?", [template[0]]).fetchall()
    )
    created = af.utc_now()
    next_id = (reg.db.execute("select max(id) from versions").fetchone()[0] or 0) + 1
    conn = reg.db.conn
    conn.execute("PRAGMA synchronous = OFF")  # a bulk fill, not the publish path being measured
    conn.execute("PRAGMA cache_size = -262144")
    cols = (
        "id, full_name, namespace, name, version, seq, vnum, digest, method, base_model, base_fingerprint, "
        "task, description, license, metrics, parents, size, created, published, is_latest"
    )
    batch_v: list[tuple] = []
    batch_f: list[tuple] = []
    batch_t: list[tuple] = []
    batch_s: list[tuple] = []

    def flush() -> None:
        conn.execute("BEGIN")
        conn.executemany(f"insert into versions ({cols}) values ({','.join('?' * 20)})", batch_v)
        conn.executemany("insert into files (version_id, filename, blob, size) values (?, ?, ?, ?)", batch_f)
        conn.executemany(
            "insert into tags (full_name, tag, version_id, updated) values (?, ?, ?, ?) "
            "on conflict (full_name, tag) do update set version_id = excluded.version_id",
            batch_t,
        )
        conn.executemany(
            "insert into latest_fts (rowid, full_name, description, task, method, base_model) "
            "values (?, ?, ?, ?, ?, ?)",
            batch_s,
        )
        conn.execute("COMMIT")
        for b in (batch_v, batch_f, batch_t, batch_s):
            b.clear()

    i = 0
    for n, name in enumerate(names):
        for k in range(per_name):
            seq = first_seq + k
            latest = k == per_name - 1
            vid, i = next_id, i + 1
            next_id += 1
            digest = "sha256:" + hashlib.sha256(f"{name}@{seq}".encode()).hexdigest()
            task = f"task{n % 10}"
            desc = description(vid)
            batch_v.append(
                (vid, name, "", name, str(seq), seq, seq, digest, "lora", "llama-tiny", None, task, desc,
                 None, "{}", "[]", sum(sizes.values()), created, time.time(), 1 if latest else None)
            )  # fmt: skip
            batch_f += [(vid, f, d, sizes[f]) for f, d in files.items()]
            if latest:
                batch_t.append((name, "latest", vid, created))
                batch_s.append((vid, name, desc, task, "lora", "llama-tiny"))
            if seq == 1:
                batch_t.append((name, "prod", vid, created))
            if len(batch_v) >= 20000:
                flush()
    if batch_v:
        flush()
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def clear_latest(reg: Registry, name: str) -> None:
    """Before bulk-adding newer versions of a name: its current latest stops being latest."""
    row = reg.db.execute(
        "select version_id from tags where full_name = ? and tag = 'latest'", [name]
    ).fetchone()
    with reg.db.conn:
        reg.db.execute("update versions set is_latest = null where id = ?", [row[0]])
        reg.db.execute("delete from latest_fts where rowid = ?", [row[0]])


def read_paths(reg: Registry, names: list[str], per_name: int, repeat: int) -> dict[str, dict[str, float]]:
    probe = names[len(names) // 2]
    mid = reg.resolve(f"{probe}@{per_name // 2}")
    deep_cursor, page = None, reg.list(limit=PAGE)  # the deepest full page, up to 20 pages in
    for _ in range(20):
        following = reg.list(limit=PAGE, cursor=page.next_cursor) if page.next_cursor else []
        if len(following) < PAGE:
            break
        deep_cursor, page = page.next_cursor, following
    cursor_all = reg.list(all_versions=True, limit=PAGE)
    versions_page = reg.versions(probe, limit=PAGE)
    return {
        "resolve name@latest": cpu_ms(lambda: reg.resolve(probe), repeat),
        "resolve name@version": cpu_ms(lambda: reg.resolve(f"{probe}@{per_name // 2}"), repeat),
        "resolve name@tag": cpu_ms(lambda: reg.resolve(f"{probe}@prod"), repeat),
        "resolve name@sha256:prefix": cpu_ms(lambda: reg.resolve(f"{probe}@{mid.digest[:19]}"), repeat),
        "by digest prefix (no name)": cpu_ms(lambda: reg.by_digest(mid.digest[:19]), repeat),
        f"list, page of {PAGE}": cpu_ms(lambda: reg.list(limit=PAGE), repeat // 4),
        f"list, page of {PAGE} deep in": cpu_ms(
            lambda: reg.list(limit=PAGE, cursor=deep_cursor), repeat // 4
        ),
        f"list --task, page of {PAGE}": cpu_ms(lambda: reg.list(task="task7", limit=PAGE), repeat // 4),
        f"list --all, page of {PAGE}": cpu_ms(
            lambda: reg.list(all_versions=True, limit=PAGE, cursor=cursor_all.next_cursor), repeat // 4
        ),
        f"search 'reviews 42', page of {PAGE}": cpu_ms(
            lambda: reg.search("reviews 42", limit=PAGE), repeat // 4
        ),
        f"search 'reviews', page of {PAGE}": cpu_ms(lambda: reg.search("reviews", limit=PAGE), repeat // 4),
        f"show --versions, page of {PAGE}": cpu_ms(
            lambda: reg.versions(probe, limit=PAGE, cursor=versions_page.next_cursor), repeat // 4
        ),
    }


def db_bytes(reg: Registry) -> int:
    reg.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return (reg.home / "registry.db").stat().st_size


# ---------------------------------------------------------------------- shapes


def one_name(tmp: Path, arts: list[Path], real: int, deep: int, log: Callable[[str], None]) -> dict:
    reg = Registry(tmp / "one")
    out: dict = {"publish": {}}

    def publish_window(count: int) -> dict[str, float]:
        start = reg.db.execute("select count(*) from versions").fetchone()[0]
        times = []
        for i in range(count):
            t0 = time.process_time()
            reg.publish(arts[(start + i) % len(arts)], name="deep/one", description=description(start + i))
            times.append((time.process_time() - t0) * 1e3)
        times.sort()
        if not times:
            return {}
        return {
            "median": statistics.median(times),
            "p99": times[min(count - 1, int(0.99 * count))],
            "n": count,
        }

    t0 = time.perf_counter()
    reg.publish(arts[0], name="deep/one", description=description(0))
    publish_window(99)
    out["publish"][100] = publish_window(100)  # versions 101-200
    publish_window(max(0, real - 300))
    out["publish"][real] = publish_window(100)
    out["real_s"] = time.perf_counter() - t0
    log(f"one name: {real} real publishes in {out['real_s']:.0f} s (load {load()})")
    if deep > real:
        t1 = time.perf_counter()
        clear_latest(reg, "deep/one")
        bulk_fill(reg, ["deep/one"], deep - real, first_seq=real + 1)
        out["fill_s"] = time.perf_counter() - t1
        out["publish"][deep] = publish_window(100)
    t2 = time.process_time()
    everything = reg.versions("deep/one")
    out["versions_all_s"] = time.process_time() - t2
    assert len(everything) >= deep
    out["versions_page"] = cpu_ms(lambda: reg.versions("deep/one", limit=PAGE, cursor=None), 50)
    t3 = time.perf_counter()
    out["verify"] = reg.verify()
    out["verify_s"] = time.perf_counter() - t3
    reg.close()
    return out


def many_names(tmp: Path, art: Path, label: str, names: int, per_name: int, repeat: int) -> dict:
    reg = Registry(tmp / label)
    reg.publish(art, name="seed/template")
    t0 = time.perf_counter()
    name_list = [f"ns{n % 100}/adapter{n:06d}" for n in range(names)]
    bulk_fill(reg, name_list, per_name)
    fill_s = time.perf_counter() - t0
    rows = reg.db.execute("select count(*) from versions").fetchone()[0]
    size = db_bytes(reg)
    reads = read_paths(reg, name_list, per_name, repeat)
    reg.close()
    return {"fill_s": fill_s, "rows": rows, "bytes": size, "reads": reads}


def gc_beside_publisher(tmp: Path, arts: list[Path], blobs: int) -> dict:
    reg = Registry(tmp / "gc")
    reg.publish(arts[0], name="gc/x")
    alone = []
    for _ in range(20):
        t0 = time.perf_counter()
        reg.publish(arts[1], name="gc/y")
        alone.append((time.perf_counter() - t0) * 1e3)
    for i in range(blobs):
        reg.store.put_bytes(f"garbage {i}".encode())
    waits: list[float] = []
    done = threading.Event()

    def publisher() -> None:
        other = Registry(reg.home)
        while not done.is_set():
            t0 = time.perf_counter()
            other.publish(arts[1], name="gc/y")
            waits.append((time.perf_counter() - t0) * 1e3)
        other.close()

    thread = threading.Thread(target=publisher)
    thread.start()
    t0 = time.perf_counter()
    report = reg.gc(grace_seconds=0)
    gc_s = time.perf_counter() - t0
    done.set()
    thread.join(timeout=60)
    reg.close()
    return {
        "removed": len(report.removed),
        "gc_s": gc_s,
        "publishes": len(waits),
        "max_wait_ms": max(waits, default=0),
        "median_ms": statistics.median(waits) if waits else 0,
        "alone_ms": statistics.median(alone),
    }


# ---------------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=int, default=10_000, help="real publishes of one name")
    parser.add_argument("--deep", type=int, default=100_000, help="versions of one name in all")
    parser.add_argument("--wide", default="100000x10", help="NAMESxVERSIONS, bulk rows")
    parser.add_argument("--deep-many", default="100x10000", help="NAMESxVERSIONS, bulk rows")
    parser.add_argument("--gc-blobs", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=400, help="samples per resolve (pages: a quarter)")
    parser.add_argument(
        "--out", type=Path, default=None, help="write the registry section of this RESULTS.md"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    loads = [load()]

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {msg}", flush=True)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        arts = [make_artifact(tmp / f"art{i}", i) for i in range(4)]
        one = one_name(tmp, arts, args.real, args.deep, log)
        loads.append(load())
        shapes = {}
        for label, spec in (("wide", args.wide), ("deep", args.deep_many)):
            names, per = (int(x) for x in spec.split("x"))
            shapes[label] = many_names(tmp, arts[0], label, names, per, args.repeat)
            shapes[label]["spec"] = f"{names:,} names x {per:,}"
            loads.append(load())
            log(
                f"{label}: {shapes[label]['rows']:,} rows filled in {shapes[label]['fill_s']:.0f} s (load {load()})"
            )
        gc = gc_beside_publisher(tmp, arts, args.gc_blobs)
        loads.append(load())
        log(f"gc: {gc}")
    total_s = time.perf_counter() - started

    cmd = "python bench/registry_bench.py " + " ".join(sys.argv[1:])
    pub = one["publish"]
    first = pub[100]["median"]
    lines = [
        "## registry",
        "",
        f"Command: `{cmd}` ({total_s / 60:.1f} min in all)",
        "Machine: 2 CPU cores shared with other agents' work, local disk, SQLite WAL, synchronous=FULL.",
        f"Load average (1/5/15 min) at start, after each shape and at the end: {', '.join(loads)}.",
        "Times are CPU time of the benchmark process (`time.process_time`), median and p99.",
        "",
        f"**Publish, one name** ({args.real:,} real publishes: validate, blob copies with fsync, one "
        f"transaction; then rows in bulk to {args.deep:,}, then 100 real publishes again):",
        "",
        "| versions of the name | publish median | p99 | vs 100 versions |",
        "|---|---|---|---|",
    ]
    for v, s in pub.items():
        lines.append(f"| {v:,} | {s['median']:.2f} ms | {s['p99']:.2f} ms | {s['median'] / first:.2f}x |")
    lines += [
        "",
        f"- `versions(name)` of all {args.deep:,} (two batched queries per 500 rows): "
        f"{one['versions_all_s']:.2f} s CPU; one page of {PAGE} (`show --versions`): "
        f"{one['versions_page']['median']:.2f} ms median, {one['versions_page']['p99']:.2f} ms p99",
        f"- `verify` of the {args.deep:,}-version name (re-hashes every blob, checks every row): "
        f"{one['verify_s']:.1f} s wall ({one['verify'].versions:,} versions, {one['verify'].blobs:,} blobs; "
        "bulk rows share blobs, so their manifests name another version: "
        f"{len(one['verify'].problems):,} problems reported, as expected)",
        f"- `gc --grace 0` over {args.gc_blobs:,} unreferenced blobs: {gc['gc_s']:.1f} s wall, "
        f"{gc['removed']:,} removed; a publisher beside it completed {gc['publishes']} publishes, "
        f"median {gc['median_ms']:.0f} ms, longest {gc['max_wait_ms']:.0f} ms wall (alone: median "
        f"{gc['alone_ms']:.0f} ms); the walk holds no lock, deletes hold it at most 50 ms at a time",
        "",
        f"**Read paths at {max(s['rows'] for s in shapes.values()):,} versions** "
        "(rows inserted in bulk into the registry's own schema):",
        "",
        "| operation | " + " | ".join(f"{k}: {s['spec']} (median / p99)" for k, s in shapes.items()) + " |",
        "|---|" + "---|" * len(shapes),
    ]
    keys = next(iter(shapes.values()))["reads"].keys()
    for key in keys:
        cells = [
            f"{s['reads'][key]['median']:.3f} / {s['reads'][key]['p99']:.3f} ms" for s in shapes.values()
        ]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines.append("")
    for label, s in shapes.items():
        lines.append(
            f"- {label}: {s['rows']:,} rows, bulk fill {s['fill_s']:.0f} s; registry.db {s['bytes'] / 2**20:,.0f} MiB "
            f"= **{s['bytes'] / s['rows']:,.0f} bytes per version** (row, 3 file rows, indexes, tags, search index)"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        from bench_results import write_section

        write_section(args.out, "registry", text)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
