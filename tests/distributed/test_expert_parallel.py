"""Expert parallelism (gloo, 2 and 4 processes): the all_to_all dispatch equals one process, layer by
layer (uneven routing included; SwiGLU and DCCA experts) and over 20 training steps of a looped
LoopMoE at (dp, ep) = (1, 2) and (2, 2) under DDP and FSDP2 (and of a DCCA LoopMoE at (1, 2)); a (2, 2) checkpoint killed mid-run resumes at (1, 1), (2, 1) and
(1, 2) with the losses of an uninterrupted run; the export is one ordinary HF checkpoint."""

import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from loopmoe.distributed.expert_parallel import check_expert_parallel
from loopmoe.training import read_metrics
from tests.distributed.test_parity import ROOT, _assert_close, _launch

# micro-batch 2 so that 4 processes share the global batch of 8; router biases move (aux-loss-free balancing)
EP_ARGS = ["train.micro_batch_size=2", "model.router_bias_update_rate=0.01"]
DUMP = {"STANDIN_DUMP_ROUTERS": "1"}
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
# per expert type: the model overrides, and the fixture holding its one-process reference run
EXPERT_TYPES = {"swiglu": ([], "single"), "dcca": (["model.expert_type=dcca"], "single_dcca")}


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("nproc", "ep", "routing", "expert_type"),
    [
        (2, 2, "spread", "swiglu"),
        (2, 2, "one_expert", "swiglu"),
        (4, 2, "one_expert", "swiglu"),
        (2, 2, "spread", "dcca"),
        (2, 2, "one_expert", "dcca"),
    ],
)
def test_moe_layer_matches_single_process(nproc, ep, routing, expert_type):
    # one_expert: every token picks experts 0 and 1, so the ranks holding the others receive zero rows
    module = "tests.distributed.ep_layer_check"
    proc = subprocess.run(
        [*LAUNCH, f"--nproc_per_node={nproc}", "-m", module, str(ep), routing, expert_type],
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _single_run(out, expert_type):
    proc = _launch(out, 1, *EP_ARGS, *EXPERT_TYPES[expert_type][0], real_model=True, env_extra=DUMP)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _single_run(tmp_path_factory.mktemp("ep_single"), "swiglu")


@pytest.fixture(scope="module")
def single_dcca(tmp_path_factory):
    return _single_run(tmp_path_factory.mktemp("ep_single_dcca"), "dcca")


def _check_against(out, single, nproc):
    _assert_close([r["loss"] for r in read_metrics(out)], [r["loss"] for r in read_metrics(single)])
    reference = torch.load(single / "routers_rank0.pt")
    assert any(b.abs().sum() > 0 for b in reference)  # the biases did move
    for rank in range(nproc):  # every rank took the same balancing decisions, those of one process
        for b, ref in zip(torch.load(out / f"routers_rank{rank}.pt"), reference):
            torch.testing.assert_close(b, ref, rtol=0, atol=1e-6)
    exported, plain = load_file(out / "final" / "model.safetensors"), load_file(single / "final" / "model.safetensors")
    assert exported.keys() == plain.keys()
    for name, w in plain.items():  # all experts, gathered from the ep blocks: one ordinary checkpoint
        assert exported[name].shape == w.shape, name
        torch.testing.assert_close(exported[name], w, rtol=1e-3, atol=1e-4)


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("nproc", "strategy", "expert_type"),
    [(2, "ddp", "swiglu"), (4, "ddp", "swiglu"), (4, "fsdp2", "swiglu"), (2, "ddp", "dcca")],
)
def test_training_matches_single_process(request, tmp_path, nproc, strategy, expert_type):
    overrides, reference = EXPERT_TYPES[expert_type]
    layout = ["dist.ep=2", f"dist.strategy={strategy}", *overrides]
    proc = _launch(tmp_path, nproc, *EP_ARGS, *layout, real_model=True, env_extra=DUMP)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_against(tmp_path, request.getfixturevalue(reference), nproc)


@pytest.fixture(scope="module")
def killed_2x2(tmp_path_factory):
    """A (dp, ep) = (2, 2) DDP run SIGKILLed at step 13, after its step-10 checkpoint."""
    out = tmp_path_factory.mktemp("ep_killed")
    proc = _launch(out, 4, *EP_ARGS, "dist.ep=2", crash_at_batch=13, real_model=True)
    assert proc.returncode != 0
    assert (out / "checkpoints" / "step_0000010" / "dcp").is_dir()
    return out


@pytest.mark.distributed
@pytest.mark.parametrize(("nproc", "layout"), [(1, []), (2, ["dist.ep=1"]), (2, ["dist.ep=2", "dist.strategy=fsdp2"])])
def test_2x2_checkpoint_resumes_at_another_layout(tmp_path, single, killed_2x2, nproc, layout):
    out = tmp_path / "run"
    shutil.copytree(killed_2x2, out)
    proc = _launch(out, nproc, *EP_ARGS, *layout, real_model=True, env_extra=DUMP)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 21))
    _check_against(out, single, nproc)


@pytest.mark.distributed
def test_expert_count_not_divisible_by_ep_fails_before_training(tmp_path):
    proc = _launch(tmp_path, 2, *EP_ARGS, "dist.ep=2", "model.num_experts=3", real_model=True)
    assert proc.returncode != 0
    assert "dist.ep = 2 does not divide the model's 3 experts: set dist.ep to a divisor of 3" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_check_expert_parallel_names_the_fix():
    check_expert_parallel(8, 4)
    with pytest.raises(ValueError, match=r"divisor of 6 \(1, 2, 3, 6\).*--expert-multiple 4"):
        check_expert_parallel(6, 4)
