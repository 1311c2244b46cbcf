"""Multi-process training: two real gloo processes run the real loop
(`train.loop.pretrain` under a process group, and `iecl pretrain` under torchrun).

What must hold: after every step both ranks hold the same parameters (DDP
averaged the gradients: each rank trains on other images, so without averaging
they would part after the first step); the ranks' batches of an epoch are
disjoint and cover it up to the dropped tail; a stop signal, a non-finite loss
or a data error on one rank is acted on by both at the same step; a 2-rank run
resumes on both ranks from rank 0's checkpoint, exactly; only rank 0 writes.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import inject_nan, tiny_config, tiny_overrides

from iecl.pipeline import DataError, open_images
from iecl.train import checkpoint as ckpt
from iecl.train import ddp
from iecl.train import loop as loop_module
from iecl.train.config import ConfigError
from iecl.train.factory import load_pretrained
from iecl.train.metrics import read_metrics
from iecl.train.run_dir import RunDirError

pytestmark = pytest.mark.distributed  # several processes (gloo, torchrun)

WORLD = 2
IMAGES = 50  # batch 8 x 2 ranks = 16 per step: 3 steps an epoch, 2 images dropped
STEPS_PER_EPOCH = 3


@pytest.fixture(scope="module")
def id_list(tiny_data, tmp_path_factory) -> Path:
    """The tiny images as a file list whose label is the entry's index: every
    batch's labels say which samples it holds, whatever the augmentations did."""
    paths = sorted(str(p) for p in Path(tiny_data).rglob("*.JPEG"))
    paths = (paths + paths)[:IMAGES]
    listing = tmp_path_factory.mktemp("ids") / "ids.txt"
    listing.write_text("".join(f"{path} {i}\n" for i, path in enumerate(paths)))
    return listing


# ------------------------------------------------------------------ inside each rank


def _digest(method) -> str:
    """Every parameter (online, target, SAIB), exactly."""
    h = hashlib.sha256()
    for p in method.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class _FaultyLoader:
    """A loader that reports bad files and fails on this rank as told:
    `bad` = {batch number: names to add}, `fail_at` = the batch that raises."""

    def __init__(self, loader, bad: dict[int, list[str]], fail_at: int | None) -> None:
        self.loader, self.bad, self.fail_at = loader, bad, fail_at
        self.bad_files: list[str] = []

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.loader.set_epoch(epoch, start_batch)

    def close(self) -> None:
        self.loader.close()

    def __iter__(self):
        for number, batch in enumerate(self.loader):
            if number == self.fail_at:
                raise DataError(f"rank {dist.get_rank()}: cannot decode test_image_{number}.JPEG")
            self.bad_files += self.bad.get(number, [])
            yield batch


def _with_faults(nan_at: set[int], bad: dict[int, list[str]], fail_at: int | None):
    """`train.loop.build`, with a NaN loss at the given steps and the loader faults."""
    real_build = loop_module.build

    def build(*args, **kwargs):
        method, loader, *rest = real_build(*args, **kwargs)
        inject_nan(method, nan_at)
        return (method, _FaultyLoader(loader, bad, fail_at), *rest)

    return build


def _run(phase: str, cfg, data: Path, out: Path, rank: int, state=None, stop_at=None, faults=None) -> dict:
    steps: list[dict] = []

    def watch(pos, method, batch):
        steps.append({"step": pos.step, "epoch": pos.epoch, "batch_in_epoch": pos.batch_in_epoch,
                      "labels": batch.label.tolist(), "params": _digest(method)})
        if stop_at is not None and rank == 1 and pos.step == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)  # this rank only

    run_dir = out / f"{phase}-rank{rank}"  # rank 1's stays empty: only rank 0 writes
    run_dir.mkdir()
    real_build = loop_module.build
    if faults is not None:
        loop_module.build = _with_faults(**faults)
    record: dict = {"steps": steps}
    if phase == "full":  # the parameters before the first step, as every rank builds them
        torch.manual_seed(cfg.run.seed)
        record["start"] = _digest(loop_module.build_model(cfg, torch.device("cpu"))[0])
    try:
        summary = loop_module.pretrain(cfg, run_dir, open_images(data), state=state, progress=False, after_step=watch)
        record.update(stopped_by=summary.stopped_by, done=summary.steps, skipped=summary.skipped_steps,
                      bad_images=summary.bad_images)
    except DataError as err:
        record["error"] = str(err)
    finally:
        loop_module.build = real_build
    return record


def _refused_on_rank0(cfg, data: Path, out: Path, rank: int) -> dict:
    """Rank 0 finds the disk full before training: both ranks must refuse (not
    one refuse and the other wait for it in DDP's first collective)."""
    from iecl.train import run_dir as run_dir_module

    real = run_dir_module.shutil.disk_usage
    if rank == 0:
        run_dir_module.shutil.disk_usage = lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000)
    run_dir = out / f"no-space-rank{rank}"
    run_dir.mkdir()
    try:
        loop_module.pretrain(cfg, run_dir, open_images(data), progress=False)
    except RunDirError as err:
        return {"error": str(err), "type": type(err).__name__}
    finally:
        run_dir_module.shutil.disk_usage = real
    return {}


def _phases(rank: int, init_file: str, data: str, out: str, cfg) -> None:
    torch.set_num_threads(1)
    data, out = Path(data), Path(out)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        records = {"full": _run("full", cfg, data, out, rank)}
        records["stopped"] = _run("stopped", cfg, data, out, rank, stop_at=2)
        dist.barrier()  # rank 0 has written the checkpoint; every rank resumes from it
        state = ckpt.load(out / "stopped-rank0" / "last.pt")
        records["resumed"] = _run("resumed", cfg, data, out, rank, state=state)
        one_epoch = copy.deepcopy(cfg)
        one_epoch.train.epochs = 1
        records["faults"] = _run("faults", one_epoch, data, out, rank, faults={
            "nan_at": {1} if rank == 1 else set(),  # step 2's loss, on rank 1 only
            "bad": {0: ["a.JPEG"]} if rank == 0 else {1: ["b.JPEG", "c.JPEG"]},
            "fail_at": None,
        })
        records["error"] = _run("error", one_epoch, data, out, rank, faults={
            "nan_at": set(), "bad": {}, "fail_at": 1 if rank == 1 else None,  # rank 1's second batch
        })
        records["no-space"] = _refused_on_rank0(cfg, data, out, rank)
        torch.save(records, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(id_list, tmp_path_factory):
    """Both ranks' records of five runs of the real loop in one process group."""
    out = tmp_path_factory.mktemp("ddp")
    cfg = tiny_config(id_list, out, {"train": {"epochs": 2}})
    mp.spawn(_phases, args=(str(out / "init"), str(id_list), str(out), cfg), nprocs=WORLD, join=True)
    return out, [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


# ------------------------------------------------------------------ the assertions


@pytest.mark.slow
def test_parameters_are_identical_on_both_ranks_after_every_step(two_ranks):
    _, (r0, r1) = two_ranks
    for phase in ("full", "stopped", "resumed", "faults"):
        assert [s["step"] for s in r0[phase]["steps"]] == [s["step"] for s in r1[phase]["steps"]], phase
        for a, b in zip(r0[phase]["steps"], r1[phase]["steps"]):
            assert a["params"] == b["params"], (phase, a["step"])
    # ...and they do train: every step of the full run changes them.
    params = [r0["full"]["start"]] + [s["params"] for s in r0["full"]["steps"]]
    assert len(set(params)) == len(params) == 7


def test_each_epoch_is_dealt_disjointly_and_completely(two_ranks):
    _, (r0, r1) = two_ranks
    for epoch in (0, 1):
        seen = [[label for s in r["full"]["steps"] if (s["step"] - 1) // STEPS_PER_EPOCH == epoch
                 for label in s["labels"]] for r in (r0, r1)]
        assert len(seen[0]) == len(seen[1]) == STEPS_PER_EPOCH * 8  # the same number of full batches
        assert len(set(seen[0])) == len(seen[0]) and not set(seen[0]) & set(seen[1])
        assert len(set(seen[0]) | set(seen[1])) == IMAGES - IMAGES % 16  # all but the dropped tail of 2


def test_a_signal_on_one_rank_stops_both_at_the_same_step(two_ranks):
    out, (r0, r1) = two_ranks
    # SIGTERM reached rank 1 after step 2's agreement: both ranks learn of it in
    # step 3's, finish step 3 and stop there.
    for r in (r0, r1):
        assert r["stopped"]["stopped_by"] == "SIGTERM" and r["stopped"]["done"] == 3
    assert ckpt.load(out / "stopped-rank0" / "last.pt")["step"] == 3


def test_both_ranks_resume_from_rank_zeros_checkpoint_exactly(two_ranks):
    _, (r0, r1) = two_ranks
    for r in (r0, r1):
        resumed, full = r["resumed"]["steps"], r["full"]["steps"]
        assert [s["step"] for s in resumed] == [4, 5, 6]
        # Each rank continues its own shard where it stopped, with the weights an
        # uninterrupted run has at each of those steps.
        assert [(s["labels"], s["params"]) for s in resumed] == [(s["labels"], s["params"]) for s in full[3:]]


def test_a_nonfinite_loss_on_one_rank_is_skipped_on_both(two_ranks):
    _, (r0, r1) = two_ranks
    for r in (r0, r1):
        steps = r["faults"]["steps"]
        assert r["faults"]["skipped"] == 1 and r["faults"]["done"] == 3
        assert steps[1]["params"] == steps[0]["params"] != steps[2]["params"]  # no update at step 2
        assert r["faults"]["bad_images"] == 3  # 1 on rank 0 + 2 on rank 1


def test_bad_images_are_summed_over_ranks_in_the_log(two_ranks):
    out, _ = two_ranks
    rows = read_metrics(out / "faults-rank0")
    assert [(r["step"], r["bad_images"], r["skipped_steps"]) for r in rows] == [(1, 1, 0), (3, 3, 1)]


def test_a_data_error_on_one_rank_stops_both_with_progress_saved(two_ranks):
    out, (r0, r1) = two_ranks
    assert "rank 1: cannot decode test_image_1.JPEG" in r1["error"]["error"]
    assert "1 other rank(s) met a data error at step 2" in r0["error"]["error"]
    for r in (r0, r1):
        assert "--resume" in r["error"]["error"] and len(r["error"]["steps"]) == 1
    assert ckpt.load(out / "error-rank0" / "last.pt")["step"] == 1


def test_only_rank_zero_writes_and_its_checkpoint_loads_in_one_process(two_ranks):
    out, _ = two_ranks
    for phase in ("full", "stopped", "resumed", "faults", "error"):
        assert not list((out / f"{phase}-rank1").iterdir()), phase
        assert {"last.pt", "metrics.jsonl", "tb"} <= {p.name for p in (out / f"{phase}-rank0").iterdir()}
    state = ckpt.load(out / "full-rank0" / "last.pt")
    assert state["world_size"] == 2 and not any(k.startswith("module.") for k in state["method"])
    method, cfg, _ = load_pretrained(out / "full-rank0")
    assert cfg.train.batch_size == 8 and method.backbone() is not None


def test_an_error_rank_zero_finds_before_training_is_raised_on_every_rank(two_ranks):
    _, (r0, r1) = two_ranks
    assert r0["no-space"]["type"] == r1["no-space"]["type"] == "RunDirError"
    assert r0["no-space"]["error"] == r1["no-space"]["error"]
    assert "1000 B free" in r0["no-space"]["error"] and "run.out_dir" in r0["no-space"]["error"]


# ------------------------------------------------------------------ the command line under torchrun


def _torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    threads = str(max(1, min(2, os.cpu_count() or 1) // WORLD))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
               "-m", "iecl.train", "--no-progress", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.slow
def test_iecl_pretrain_under_torchrun_trains_and_resumes(tmp_path, tiny_data):
    """`torchrun -m train` end to end: one run folder, one header and summary
    (rank 0's), the learning rate scaled by the global batch, and `--resume`
    continuing on both ranks from rank 0's checkpoint."""
    out = tmp_path / "runs"
    done = _torchrun(*tiny_overrides(), f"data.root={tiny_data}", f"run.out_dir={out}", "train.epochs=1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Grad strides do not match" not in done.stderr  # DDP copies no gradient into its buckets
    (run_dir,) = out.iterdir()
    assert done.stdout.count("iecl pretrain: iecl resnet18") == 1  # the header, from rank 0 alone
    assert "2 rank(s) (gloo), batch 8 per rank = 16 global, lr 0.00025 (optim.lr 0.004 x 16/256)" in done.stdout
    assert done.stdout.count("done: 3 steps (1.00 epochs)") == 1  # 48 images / 16 per step
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    assert read_metrics(run_dir)[0]["lr"] == pytest.approx(4e-3 * 16 / 256 * 1 / 2)  # warm-up 1.5 -> 2 steps
    assert ckpt.load(run_dir / "last.pt")["world_size"] == 2

    resumed = _torchrun("--resume", str(run_dir), "train.epochs=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("resuming at step 3") == 1 and "done: 6 steps (2.00 epochs)" in resumed.stdout
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert ckpt.load(run_dir / "last.pt")["step"] == 6
    assert list(out.iterdir()) == [run_dir]


def test_resuming_with_another_number_of_ranks_is_refused(tmp_path, tiny_data):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = tiny_config(tiny_data, tmp_path, {"train": {"max_steps": 1}})
    loop_module.pretrain(cfg, run_dir, open_images(tiny_data), progress=False)
    state = ckpt.load(run_dir / "last.pt")
    state["world_size"] = 2  # as if made by two ranks
    with pytest.raises(ckpt.CheckpointError, match="made by 2 rank"):
        loop_module.pretrain(cfg, tmp_path, open_images(tiny_data), state=state, progress=False)


# ------------------------------------------------------------------ torchrun's environment


def test_torchrun_environment_is_read_or_refused():
    full = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
    assert ddp.launch_from_env({}) is None
    assert ddp.launch_from_env(full) == ddp.Launch(rank=1, local_rank=1, world_size=4)
    with pytest.raises(ConfigError, match="but not MASTER_ADDR, MASTER_PORT"):
        ddp.launch_from_env({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="inconsistent torchrun environment"):
        ddp.launch_from_env({**full, "RANK": "4"})


def test_without_a_process_group_the_helpers_are_single_process(tiny_data, tmp_path):
    assert (ddp.rank(), ddp.world_size(), ddp.is_main(), ddp.initialized()) == (0, 1, True, False)
    assert ddp.from_main(lambda: 7) == 7 and ddp.main_first(lambda: 8) == 8
    cfg = tiny_config(tiny_data, tmp_path)
    method = loop_module.build_model(cfg, torch.device("cpu"))[0]
    assert ddp.wrap(method, torch.device("cpu")) is method


# ------------------------------------------------------------------ each backend's shard, through the loop's build


def _labels(loader, epoch: int, start: int = 0) -> list[list[int]]:
    loader.set_epoch(epoch, start)
    return [batch.label.tolist() for batch in loader]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["pil", "dali", "ffcv"])
def test_each_backend_shards_by_rank_and_resumes_mid_epoch(backend, id_list, tmp_path):
    """`train.loop.build` hands each backend the rank's shard: disjoint, equally
    long, the epoch up to its dropped tail; `set_epoch(e, k)` continues exactly
    where batch k of the same shard would have come."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    if backend == "ffcv":
        import importlib.util

        if importlib.util.find_spec("ffcv") is None:  # importing ffcv would set torch to one thread
            pytest.skip("ffcv is not installed")
        from iecl.pipeline.ffcv import convert
        from iecl.pipeline.sources import open_beton

        root = tmp_path / "ids.beton"
        convert(open_images(id_list), root, max_resolution=64, workers=1, progress=False)
        images = open_beton(root)
    else:
        root, images = id_list, open_images(id_list)
    cfg = tiny_config(root, tmp_path, {"data": {"backend": backend}})
    shards = []
    for rank in range(WORLD):
        loader = loop_module.build(cfg, images, torch.device("cpu"), rank=rank, world_size=WORLD)[1]
        try:
            epoch = _labels(loader, 1)
            assert len(loader) == len(epoch) == STEPS_PER_EPOCH and all(len(b) == 8 for b in epoch)
            assert _labels(loader, 1, start=2) == epoch[2:]  # a resume at batch 2 of epoch 1
        finally:
            loader.close()
        shards.append({label for batch in epoch for label in batch})
    assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == IMAGES - IMAGES % 16


# ------------------------------------------------------------------ every method, SyncBatchNorm


def _every_method(rank: int, init_file: str, data: str, out: str, configs: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        digests = {}
        for name, cfg in configs.items():
            steps: list[str] = []
            run_dir = Path(out) / f"{name}-rank{rank}"
            run_dir.mkdir()
            loop_module.pretrain(cfg, run_dir, open_images(data), progress=False,
                                 after_step=lambda pos, method, batch, steps=steps: steps.append(_digest(method)))
            digests[name] = steps
        torch.save(digests, Path(out) / f"methods-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_method_trains_in_lockstep_under_ddp(id_list, tmp_path):
    """Each baseline (with SAIB: a parameter DDP must see used) for two steps:
    no unused-parameter error, and the same parameters on both ranks. MoCo's
    queue and SimCLR's negatives go through the methods' own gathers."""
    configs = {
        name: tiny_config(id_list, tmp_path, {"method": {"name": name, "queue_size": 64},
                                              "train": {"max_steps": 2}})
        for name in ("mocov2", "simclr", "byol", "simsiam")
    }
    mp.spawn(_every_method, args=(str(tmp_path / "init"), str(id_list), str(tmp_path), configs), nprocs=WORLD,
             join=True)
    r0, r1 = (torch.load(tmp_path / f"methods-rank{r}.pt") for r in range(WORLD))
    for name in configs:
        assert len(r0[name]) == 2 and r0[name] == r1[name], name
        assert r0[name][0] != r0[name][1], name


def test_sync_batchnorm_converts_the_encoders_not_saib(tiny_data, tmp_path):
    from torch import nn

    cfg = tiny_config(tiny_data, tmp_path, {"method": {"name": "byol"}, "train": {"sync_bn": True}})
    plain = loop_module.build_model(cfg, torch.device("cpu"))[0]  # one process: sync_bn does nothing
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in plain.modules())
    method, optimizer, *_ = loop_module.build_model(cfg, torch.device("cpu"))
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    ddp.convert_sync_batchnorm(method)
    for name in ("online", "target", "predictor"):
        norms = [m for m in getattr(method, name).modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms), name
    saib_norms = [m for m in method.saib.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert saib_norms and not any(isinstance(m, nn.SyncBatchNorm) for m in saib_norms)
    # The optimizer still holds the parameters, and checkpoints keep their keys.
    assert {id(p) for p in method.parameters() if p.requires_grad} <= params
    assert method.state_dict().keys() == plain.state_dict().keys()
