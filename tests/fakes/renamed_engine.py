"""A multi-process engine that renames its processes with ``setproctitle``, as vLLM does
(``VLLM::EngineCore``, ``VLLM::Worker_TP1``...): renaming overwrites the memory that
``/proc/<pid>/environ`` reads, so the renamed processes lose their ``SAGELLM_ENGINE_ID``
tag as far as anyone else can see.

``python renamed_engine.py [--workers N] [--rename-leader]``: start N worker processes
(same session and process group, inherited environment) that rename themselves
``VLLM::Worker_TP<i>`` and sleep; with ``--rename-leader`` the leader renames itself
``VLLM::APIServer`` too. Prints ``ready <pid>...`` (the workers' pids) once every
worker has renamed itself, then sleeps until signalled. Workers are not stopped when
the leader dies: like vLLM's after a crash, they outlive it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import setproctitle


def worker(index: int) -> int:
    setproctitle.setproctitle(f"VLLM::Worker_TP{index}")
    print("renamed", flush=True)  # to the leader's pipe: the title is set
    time.sleep(3600)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rename-leader", action="store_true")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args.worker)
    if args.rename_leader:
        setproctitle.setproctitle("VLLM::APIServer")
    workers = [
        subprocess.Popen([sys.executable, __file__, "--worker", str(i)], stdout=subprocess.PIPE)
        for i in range(args.workers)
    ]
    for w in workers:
        assert w.stdout is not None
        w.stdout.readline()
    print("ready", *(w.pid for w in workers), flush=True)
    time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
