"""Data-parallel training on CPU: two gloo processes against one process on the same total batch.

The two processes are started the way ``torchrun --nproc_per_node 2`` starts them (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT), running ``tests/_dist_worker.py``; the one-process reference
runs here, without any launcher.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from agents.config import TrainConfig
from agents.distributed import DistContext, ShardedRollout, local_pairs
from agents.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_dist_worker.py")
LAUNCH_TIMEOUT_S = 420  # a hung collective fails the test instead of blocking the suite (generous: shared CPUs)

# Tolerance. Both runs use the same samples, shuffles and global loss normalisation; they differ only
# in floating-point summation order (each process accumulates its own micro-batches, then gloo adds
# them). AdamW's step is lr·m/(√v + ε): with the default ε = 1e-8 a parameter whose true gradient is
# ~0 but carries 1e-9 of rounding noise moves by ±lr, so two *correct* runs can differ by 2·lr there
# (measured in one process, micro-batch 16 vs 5: 1.2e-3). The tests therefore use ε = 1e-4, which keeps
# the step a smooth function of the gradient: then micro-batch 16 vs 5 in one process differ by at most
# 2.5e-6 (full UNet) and 9.4e-7 (LoRA) after one epoch. A lost or double-counted gradient shard moves
# parameters by ~lr/2 = 5e-4 with lr = 1e-3, far above the tolerance below.
PARAM_ATOL = 2e-5


def _cfg(tiny_sd, run_dir, **kw) -> dict:
    base = dict(env_id="Denoise-SD14-Incompressibility-v0", algo="ddpo-is", num_epochs=1, samples_per_epoch=8,
                sample_batch_size=2, train_batch_size=4, micro_batch_size=16, num_steps=3, learning_rate=1e-3,
                env_kwargs=dict(model=str(tiny_sd), height=16, width=16, prompts=["a cat", "a dog", "a red circle"]),
                run_dir=str(run_dir), progress=False, per_prompt_min_count=2, per_prompt_buffer_size=8,
                num_eval_prompts=1)  # fmt: skip
    return {**base, **kw}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(spec: dict, tmp_path: Path, nproc: int = 2, argv: list[str] | None = None) -> tuple[list[int], list[str]]:
    """Run the worker on ``nproc`` processes; returns exit codes and logs. Fails the test (after killing
    them) if they are not all done within LAUNCH_TIMEOUT_S."""
    spec_path = tmp_path / f"spec-{len(list(tmp_path.glob('spec-*')))}.json"
    spec_path.write_text(json.dumps(spec))
    port = _free_port()
    procs, logs = [], []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                   PYTHONPATH=str(ROOT), DENOISE_DIST_TIMEOUT_S="120")  # fmt: skip
        log = open(tmp_path / f"{spec_path.stem}-rank{rank}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen(argv or [sys.executable, str(WORKER), str(spec_path)], env=env, cwd=ROOT,
                                      stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
    try:
        codes = [p.wait(timeout=LAUNCH_TIMEOUT_S) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    if codes is None:
        pytest.fail(f"{nproc}-process run hung for {LAUNCH_TIMEOUT_S} s:\n" + "\n".join(t[-3000:] for t in texts))
    return codes, texts


def launch(spec: dict, tmp_path: Path, nproc: int = 2) -> list[str]:
    codes, texts = run_workers(spec, tmp_path, nproc)
    if any(codes):
        pytest.fail(f"{nproc}-process run failed with exit codes {codes}:\n" + "\n".join(t[-3000:] for t in texts))
    return texts


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "charts/samples_per_s"} for r in rows]


def _compare(ref: dict[str, torch.Tensor], out: Path, name: str, report: dict) -> None:
    r0 = load_file(str(out / f"{name}-rank0.safetensors"))
    r1 = load_file(str(out / f"{name}-rank1.safetensors"))
    assert r0.keys() == ref.keys()
    for k in r0:  # every process applied the same all-reduced update
        assert torch.equal(r0[k], r1[k]), k
    diff = max(float((r0[k] - ref[k]).abs().max()) for k in ref)
    report[name] = diff
    print(f"{name}: max |2-process - 1-process| parameter difference = {diff:.3g}")
    assert diff <= PARAM_ATOL, f"{name}: max |2-process − 1-process| = {diff:.3g} > {PARAM_ATOL}"


@pytest.mark.timeout(900)
def test_two_processes_equal_one_process_and_resume(tiny_sd, tmp_path):
    """After one epoch (DDPO-IS with LoRA; RWR, DDPO-SF and the README's REINFORCE example written on the rollout
    buffer, full fine-tuning) 2 processes hold the 1-process weights; a 2-process run then resumes from its
    checkpoint in a fresh launch and still matches."""
    import benchmarks.examples.my_algo  # noqa: F401  (registers "reinforce" here; the workers import it too)

    out = tmp_path / "out"
    out.mkdir()
    # clip_range 0.5: no pair near PPO's clip boundary (ratios stay within 1 ± 0.01 here), so the update
    # is a smooth function of the gradients and rounding differences cannot flip a pair in or out of the clip.
    lora = _cfg(tiny_sd, tmp_path / "lora2", lora_rank=2, clip_range=0.5, adam_epsilon=1e-4)
    rwr = _cfg(tiny_sd, tmp_path / "rwr2", algo="rwr", rwr_updates_per_epoch=2, samples_per_epoch=4, adam_epsilon=1e-4)
    sf = _cfg(tiny_sd, tmp_path / "sf2", algo="ddpo-sf", samples_per_epoch=4, train_batch_size=4, adam_epsilon=1e-4)
    ex = _cfg(tiny_sd, tmp_path / "ex2", algo="reinforce", samples_per_epoch=4, train_batch_size=2, adam_epsilon=1e-4)
    runs = [{"name": "lora", "config": lora}, {"name": "rwr", "config": rwr}, {"name": "sf", "config": sf},
            {"name": "reinforce", "config": ex}]  # fmt: skip
    launch({"out": str(out), "runs": runs, "imports": ["benchmarks.examples.my_algo"]}, tmp_path)

    # The one-process reference, in this process, with no launcher: same total batch per epoch.
    ref_lora = Trainer(TrainConfig(**{**lora, "run_dir": str(tmp_path / "lora1"), "num_epochs": 2}))
    ref_lora.train_epoch()
    ref_lora_state1 = ref_lora.trainable_state()
    ref_rwr = Trainer(TrainConfig(**{**rwr, "run_dir": str(tmp_path / "rwr1")}))
    ref_rwr.train_epoch()
    ref_sf = Trainer(TrainConfig(**{**sf, "run_dir": str(tmp_path / "sf1")}))
    ref_sf.train_epoch()
    ref_ex = Trainer(TrainConfig(**{**ex, "run_dir": str(tmp_path / "ex1")}))
    ref_ex.train_epoch()

    report: dict[str, float] = {}
    assert all("lora" in k for k in ref_lora_state1)  # the synced gradients include the LoRA adapters
    _compare(ref_lora_state1, out, "lora", report)
    _compare(ref_rwr.trainable_state(), out, "rwr", report)
    _compare(ref_sf.trainable_state(), out, "sf", report)
    _compare(ref_ex.trainable_state(), out, "reinforce", report)
    # Same samples as one process (sharded by global batch index): the rewards agree (bit for bit here;
    # 1e-6 leaves room for thread-count-dependent rounding in the UNet, the workers use 1 thread).
    hist = json.loads((out / "lora-rank0.json").read_text())
    assert hist["world_size"] == 2
    for key in ("charts/reward_mean", "charts/reward_std"):
        assert math.isclose(hist["history"][0][key], ref_lora.history[0][key], rel_tol=1e-6), key
    assert hist["history"][0]["charts/reward_queries"] == 8
    # Only the main process wrote the run directory; the checkpoint is complete.
    run = Path(lora["run_dir"])
    assert (run / "checkpoints" / "latest").read_text() == "ckpt-0001"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert not list((run / "checkpoints").glob(".*tmp*"))

    # Resume on 2 processes (a fresh launch) for a second epoch; compare with the reference's epoch 2.
    launch({"out": str(out), "runs": [{"name": "lora-resumed", "resume": True, "config": {**lora, "num_epochs": 2}}]},
           tmp_path)  # fmt: skip
    ref_lora.train_epoch()
    _compare(ref_lora.trainable_state(), out, "lora-resumed", report)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert (run / "checkpoints" / "latest").read_text() == "ckpt-0002"
    for a, b in zip(_strip(rows), _strip(ref_lora.history)):
        assert math.isclose(a["charts/reward_mean"], b["charts/reward_mean"], rel_tol=1e-6)
        assert a["losses/optimizer_steps"] == b["losses/optimizer_steps"]
    (tmp_path.parent / f"{tmp_path.name}-param-diff.json").write_text(json.dumps(report))
    print(f"max |2-process - 1-process| parameter difference: {report}")


@pytest.mark.timeout(300)
def test_failure_on_one_process_stops_every_process(tiny_sd, tmp_path):
    """Sampling fails on rank 1 only: rank 0 must not wait forever in the gather; both exit with an error
    naming the failing process; the run directory holds no checkpoint."""
    out = tmp_path / "out"
    out.mkdir()
    cfg = _cfg(tiny_sd, tmp_path / "fail", samples_per_epoch=4)
    codes, texts = run_workers({"out": str(out), "fail_collect_on_rank": 1,
                                "runs": [{"name": "fail", "config": cfg}]}, tmp_path)  # fmt: skip
    assert codes[0] != 0 and codes[1] != 0
    assert "process 1 of 2 failed while collecting samples: RuntimeError: injected sampling failure" in texts[0]
    assert not (tmp_path / "fail" / "checkpoints" / "latest").exists()


def test_indivisible_sizes_are_refused_with_the_rule():
    cfg = TrainConfig(samples_per_epoch=6, sample_batch_size=2, train_batch_size=2)
    with pytest.raises(ValueError, match="multiple of sample_batch_size × processes = 4"):
        DistContext(0, 2).check_config(cfg)
    with pytest.raises(ValueError, match="expected device='cuda'"):
        DistContext(0, 2).check_config(TrainConfig(samples_per_epoch=4, sample_batch_size=2, device="cuda:0"))
    DistContext().check_config(cfg)  # one process: any multiple of sample_batch_size


COLLECTIVES = """
import json, sys, torch
from agents import distributed
ctx = distributed.init()
r = ctx.rank
params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(3)]
params[0].grad = torch.full((2,), float(r + 1))    # both ranks: summed
params[1].grad = torch.full((2,), 5.0) if r == 1 else None  # one rank: the other counts zeros
ctx.all_reduce_grads(params)                         # params[2]: no rank has a gradient
out = {"grads": [None if p.grad is None else p.grad.tolist() for p in params],
       "gathered": ctx.all_gather_json({"rank": r, "text": "é\\x00" * (r + 1)}),
       "any": [ctx.any(r == 1), ctx.any(False)], "shard": list(ctx.shard_range(6))}
try:
    ctx.on_main(lambda: 1 / 0)
except Exception as exc:
    out["on_main"] = f"{type(exc).__name__}: {exc}"
open(sys.argv[1] + f"-{r}.json", "w").write(json.dumps(out))
distributed.shutdown()
"""


@pytest.mark.timeout(300)
def test_collectives_on_two_processes(tmp_path):
    codes, texts = run_workers({}, tmp_path, argv=[sys.executable, "-c", COLLECTIVES, str(tmp_path / "res")])
    assert codes == [0, 0], texts
    res = [json.loads((tmp_path / f"res-{r}.json").read_text()) for r in range(2)]
    for r, out in enumerate(res):
        assert out["grads"] == [[3.0, 3.0], [5.0, 5.0], None]  # a gradient nobody has stays None
        assert out["gathered"] == [{"rank": 0, "text": "é\x00"}, {"rank": 1, "text": "é\x00é\x00"}]
        assert out["any"] == [True, False]
        assert out["shard"] == [[0, 1, 2], [3, 4, 5]][r]
    assert res[0]["on_main"] == "ZeroDivisionError: division by zero"  # the main process re-raises
    assert res[1]["on_main"] == "RuntimeError: the main process failed: ZeroDivisionError: division by zero"


def test_sharding_helpers_in_one_process_are_identities():
    ctx = DistContext()
    assert list(ctx.shard_range(6)) == list(range(6))
    assert ctx.any(True) and not ctx.any(False)
    t = torch.tensor([1.0, 2.0])
    assert ctx.all_reduce_sum(t) is t
    assert ctx.all_gather_json({"a": 1}) == [{"a": 1}]


def test_local_pairs_maps_global_indices_to_owned_local_ones():
    local = type("R", (), {"num_samples": 3, "num_steps": 2})()
    sharded = ShardedRollout(local=local, prompts=tuple("abcdef"), rewards=torch.arange(6.0), offset=3)
    sample_idx = torch.tensor([5, 0, 3, 4, 1, 3])
    step_idx = torch.tensor([0, 1, 1, 0, 1, 0])
    adv = torch.arange(6.0) * 10
    got_local, lidx, sidx, a = local_pairs(sharded, sample_idx, step_idx, adv)
    assert got_local is local
    assert lidx.tolist() == [2, 0, 1, 0] and sidx.tolist() == [0, 1, 0, 0] and a.tolist() == [50, 30, 40, 30]
    two = [DistContext(r, 2) for r in range(2)]
    assert [list(c.shard_range(4)) for c in two] == [[0, 1], [2, 3]]


@pytest.mark.timeout(600)
def test_two_processes_train_the_flow_family_as_one_process(tiny_sd3, tmp_path):
    """The same two-process equivalence on the SD3-layout toy (flow SDE, LoRA on the MMDiT's projections)."""
    out = tmp_path / "out"
    out.mkdir()
    flow = _cfg(tiny_sd3, tmp_path / "flow2", lora_rank=2, clip_range=0.5, adam_epsilon=1e-4, eta=0.7,
                guidance_scale=4.5, env_kwargs=dict(model=str(tiny_sd3), height=16, width=16,
                                                    prompts=["a cat", "a dog", "a red circle"]))  # fmt: skip
    launch({"out": str(out), "runs": [{"name": "flow", "config": flow}], "imports": []}, tmp_path)
    ref = Trainer(TrainConfig(**{**flow, "run_dir": str(tmp_path / "flow1")}))
    ref.train_epoch()
    assert ref.env.family.name == "sd3-flow"
    _compare(ref.trainable_state(), out, "flow", {})
