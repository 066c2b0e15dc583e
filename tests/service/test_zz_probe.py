"""Diagnostic probe (not for main): the stall of slot reads during a stream."""

import asyncio
import os
import subprocess
import time
from pathlib import Path

import httpx
import psutil

from roma_service.engine.binding import bind_request
from tests.fixtures.engine import patch_bytes, perturbed_routers, prompt_ids

OUT = Path(os.environ.get("PROBE_OUT", "/tmp/probe"))
DUMP = os.environ.get("PROBE_DUMP", "0") == "1"


def _pids(root: int) -> dict[str, int]:
    proc = psutil.Process(root)
    out = {"api": root}
    for child in proc.children(recursive=True):
        name = " ".join(child.cmdline())[:80]
        out[f"{child.pid}:{name}"] = child.pid
    return out


def _dump(pids: dict[str, int], tag: str) -> None:
    env = {**os.environ, "PYTHONPATH": "/tmp/pyspy"}
    for name, pid in pids.items():
        r = subprocess.run(
            ["/tmp/pyspy/bin/py-spy", "dump", "--pid", str(pid), "--locals"][:4],
            capture_output=True,
            text=True,
            env=env,
        )
        with (OUT / f"dump-{tag}.txt").open("a") as f:
            f.write(f"=== {name} t={time.perf_counter():.3f}\n{r.stdout}{r.stderr}\n")


def _sched(pids: list[int]) -> dict[tuple[int, int, str], tuple[int, int]]:
    out = {}
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                run, wait, _ = (int(x) for x in (task / "schedstat").read_text().split())
                comm = (task / "comm").read_text().strip()
            except OSError:
                continue
            out[(pid, int(task.name), comm)] = (run, wait)
    return out


def _sched_delta(before, after) -> list:
    rows = []
    for key, (run, wait) in after.items():
        r0, w0 = before.get(key, (0, 0))
        dr, dw = (run - r0) / 1e6, (wait - w0) / 1e6
        if dr > 5 or dw > 5:
            rows.append((key, round(dr), round(dw)))
    return sorted(rows)


async def test_probe(engine, slots_freed):
    OUT.mkdir(exist_ok=True)
    model_dir = engine.model_dir
    a = perturbed_routers(model_dir, seed=301)
    prompt = prompt_ids(model_dir)[0]
    pids = _pids(engine.process.proc.pid)
    print("pids", pids)
    for pid in pids.values():
        try:
            print(pid, psutil.Process(pid).cpu_affinity(), len(psutil.Process(pid).threads()))
        except psutil.Error as e:
            print(pid, e)
    if os.environ.get("PROBE_HF") == "1":
        from tests.fixtures.engine import hf_greedy

        if os.environ.get("PROBE_THREADS"):
            import torch

            torch.set_num_threads(int(os.environ["PROBE_THREADS"]))
        t = time.perf_counter()
        hf_greedy(model_dir, prompt_ids(model_dir), 12, routers=a)
        print("hf greedy took", round(time.perf_counter() - t, 3))
    async with engine.client() as client:
        await client.load_slot(patch_bytes(model_dir, a), 301)
        body = bind_request(
            {
                "model": str(model_dir),
                "prompt": prompt,
                "max_tokens": 480,
                "temperature": 0.0,
                "ignore_eos": True,
                "stream": True,
                "return_token_ids": True,
            },
            301,
        )
        await client.pause("keep")
        await client.resume()
        t0 = time.perf_counter()
        chunks = []

        async def read():
            async with (
                httpx.AsyncClient(base_url=engine.url, timeout=300) as http,
                http.stream("POST", "/v1/completions", json=body) as r,
            ):
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        chunks.append(round(time.perf_counter() - t0, 3))

        import gc
        import sys

        gcs = []
        starts = {}

        def on_gc(phase, info):
            now = time.perf_counter() - t0
            if phase == "start":
                starts[info["generation"]] = now
            else:
                gcs.append(
                    (
                        info["generation"],
                        round(starts[info["generation"]], 3),
                        round(now - starts[info["generation"]], 3),
                        info["collected"],
                    )
                )

        gc.callbacks.append(on_gc)
        rec = None
        if os.environ.get("PROBE_RECORD") == "1":
            rec = subprocess.Popen(
                [
                    "/tmp/pyspy/bin/py-spy",
                    "record",
                    "--pid",
                    str(os.getpid()),
                    "--rate",
                    "50",
                    "--native",
                    "--format",
                    "raw",
                    "--duration",
                    "4",
                    "--threads",
                    "-o",
                    str(OUT / "rec.txt"),
                ],
                env={**os.environ, "PYTHONPATH": "/tmp/pyspy"},
            )
            await asyncio.sleep(1.0)
            t0 = time.perf_counter()
        print("tracked objects", len(gc.get_objects()), gc.get_threshold(), gc.get_count())
        watch = [
            os.getpid(),
            *pids.values(),
            *(int(x) for x in os.environ.get("PROBE_PIDS", "").split()),
        ]
        for pid in watch:
            for task in Path(f"/proc/{pid}/task").glob("*"):
                tid = int(task.name)
                try:
                    ag = Path(f"/proc/{pid}/autogroup").read_text().strip()
                    if os.environ.get("PROBE_TASKS") == "1":
                        print(
                            "task",
                            pid,
                            tid,
                            (task / "comm").read_text().strip(),
                            "aff",
                            sorted(os.sched_getaffinity(tid)),
                            "pol",
                            os.sched_getscheduler(tid),
                            "nice",
                            os.getpriority(os.PRIO_PROCESS, tid),
                            ag,
                        )
                except OSError as e:
                    if os.environ.get("PROBE_TASKS") == "1":
                        print("task", pid, tid, e)
        before = _sched(watch)
        t0 = time.perf_counter()
        task = asyncio.create_task(read())
        polls = []
        dumps = 0
        while not task.done():
            t = time.perf_counter()
            poll = asyncio.create_task(client.slots())
            while not poll.done():
                await asyncio.sleep(0.02)
                if DUMP and time.perf_counter() - t > 0.15 and dumps < 3:
                    dumps += 1
                    print("dumping at", round(time.perf_counter() - t0, 3))
                    await asyncio.to_thread(_dump, pids, str(dumps))
            st = poll.result()
            polls.append(
                (
                    round(t - t0, 3),
                    round(time.perf_counter() - t, 3),
                    st.resident()[301].in_flight,
                    st.steps,
                )
            )
        gc.callbacks.remove(on_gc)
        after = _sched(watch)
        print("wall", round(time.perf_counter() - t0, 3), "pid", os.getpid())
        for row in _sched_delta(before, after):
            print("sched run/wait ms", row)
        print("gcs", [g for g in gcs if g[0] == 2 or g[2] > 0.05])
        if rec is not None:
            rec.wait()
        print("chunks", len(chunks), "first", chunks[:5], "last", chunks[-3:])
        gaps = sorted((round(b - a, 3), a) for a, b in zip(chunks, chunks[1:], strict=False))[-5:]
        print("largest chunk gaps", gaps)
        print("polls", polls[:12], len(polls))
