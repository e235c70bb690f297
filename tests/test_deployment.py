"""Deployment: ``dbn_kernels.revert`` and what works with and without it (folding convolutions
with batch norm, torch.fx, ONNX through both exporters, TorchScript, torch.export).

Every network is trained a few steps first, so that the DBN averages, the running statistics and
the parameters are all non-trivial and differ from one another; the expected output is always
the unreverted model's own eval output. Inputs are fresh each run: a failure prints its seed,
and ``DBN_DEPLOY_SEED=N`` replays it.
"""

import contextlib
import copy
import io
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

import dbn_kernels as dbn
from torch_compat import torch_norm

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SPATIAL = {1: (9,), 2: (6, 7), 3: (3, 4, 5)}
CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}
# convert() arguments of each kind of layer under test
KINDS = {"bn": {"alpha": None}, "dbn": {"alpha": 0.25},
         "dbn-running": {"alpha": 0.25, "eval_stats": "running"}}


@pytest.fixture(autouse=True)
def fresh_seed():
    seed = int(os.environ.get("DBN_DEPLOY_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    print(f"seed {seed} (DBN_DEPLOY_SEED={seed} replays it)")  # shown when a test fails
    return seed


def _inputs(dims, batch=8, memory_format=None):
    x = torch.randn(batch, 3, *SPATIAL[dims]) * 2 + 0.5
    return x if memory_format is None else x.contiguous(memory_format=memory_format)


def _train(model, dims, steps=3):
    """A few SGD steps, so that weight, bias and every statistic move away from their start
    (the schedule a_k = 0.25 leaves the DBN averages far from the running statistics)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        # shifted and rescaled per step: statistics that change from batch to batch
        out = model(_inputs(dims) * (1 + step) + step)
        opt.zero_grad()
        (out - 1).square().mean().backward()
        opt.step()
    return model.eval()


def conv_net(kind, dims=2, bias=True):
    """conv -> layer -> relu -> conv -> layer(bias=bias), converted to ``kind`` and trained."""
    Conv, BN = CONV[dims], TORCH_BN[dims]
    model = nn.Sequential(Conv(3, 5, 3), BN(5), nn.ReLU(), Conv(5, 4, 1),
                          torch_norm(BN, 4, bias=bias))
    dbn.convert(model, **KINDS[kind])
    return _train(model, dims)


def eval_out(model, x):
    with torch.no_grad():
        return model(x)


@contextlib.contextmanager
def quiet():
    """Without the exporters' and torch.jit's notices (deprecations, tracer chatter)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def fx_fuse(model):
    """``torch.fx.experimental.optimization.fuse``, imported on first use: the import defines
    TorchScript modules, which torch 2.11 warns about."""
    with quiet():
        from torch.fx.experimental.optimization import fuse
    return fuse(model)


def close(actual, expected, atol):
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


# ---- revert --------------------------------------------------------------------------------


def test_dbn_statistics_differ_from_the_running_ones():
    """What makes the checks below able to fail: a DBN net evaluates differently from the same
    net evaluating with its running statistics, so folding the wrong ones is seen."""
    model = conv_net("dbn")
    x = _inputs(2)
    dbn_out = eval_out(model, x)
    for layer in (model[1], model[4]):
        layer.eval_stats = "running"
    assert (eval_out(model, x) - dbn_out).abs().max() > 1e-2
    # and torch's folding of an unreverted DBN layer is that wrong answer
    for layer in (model[1], model[4]):
        layer.eval_stats = "dbn"
    folded = fuse_conv_bn_eval(model[0], model[1])
    assert (model[4](model[3](model[2](folded(x)))) - dbn_out).abs().max() > 1e-2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_revert_keeps_parameters_state_and_output(kind, bias):
    model = conv_net(kind, bias=bias)
    x = _inputs(2)
    expected = eval_out(model, x)
    old = [model[1], model[4]]
    model.train()  # the flag is kept, whichever it is
    model[4].eval()
    assert dbn.revert(model) is model
    for i, layer in zip((1, 4), old):
        new = model[i]
        assert type(new) is nn.BatchNorm2d
        assert new.weight is layer.weight
        assert new.bias is layer.bias
        assert (new.bias is None) == (i == 4 and not bias)
        assert new.num_batches_tracked is layer.num_batches_tracked
        assert int(new.num_batches_tracked) == 3
        assert (new.eps, new.momentum, new.affine, new.track_running_stats, new.training) == \
            (layer.eps, layer.momentum, layer.affine, layer.track_running_stats, layer.training)
        if kind == "dbn":
            close(new.running_mean, layer.dbn_mean, 0)
            assert new.running_mean is not layer.dbn_mean
            want = (layer.dbn_std.double() ** 2 - layer.eps).clamp_min(0).float()
            close(new.running_var, want, 0)
            # what batch norm divides by is dbn_std, to float32's rounding
            torch.testing.assert_close(torch.sqrt(new.running_var + new.eps), layer.dbn_std,
                                       rtol=2e-7, atol=0)
        else:
            assert new.running_mean is layer.running_mean
            assert new.running_var is layer.running_var
        # torch's own state_dict: no dbn_* buffers; a bias-free layer has no bias entry
        assert set(new.state_dict()) == set(torch_norm(nn.BatchNorm2d, 5, bias=new.bias is not None)
                                            .state_dict())
    close(eval_out(model.eval(), x), expected, 1e-5)


def test_revert_bare_layers_sync_dtype_and_options():
    # a bare layer comes back as its replacement; float64 and the options are kept
    layer = dbn.DiminishingBatchNorm3d(4, eps=1e-3, momentum=None, dtype=torch.float64)
    x = torch.randn(6, 4, 2, 3, 3, dtype=torch.float64) * 3 + 1
    layer(x)
    layer(x * 2)
    layer.eval()
    expected = eval_out(layer, x)
    new = dbn.revert(layer)
    assert type(new) is nn.BatchNorm3d and new.running_var.dtype == torch.float64
    assert new.momentum is None and new.eps == 1e-3
    close(eval_out(new, x), expected, 1e-12)

    # affine=False, and a plain layer that keeps no statistics (its eval uses the batch's)
    for layer in (dbn.BatchNorm1d(3, affine=False), dbn.BatchNorm1d(3, track_running_stats=False)):
        layer(torch.randn(5, 3, 4))
        layer.eval()
        x = torch.randn(5, 3, 4)
        new = dbn.revert(layer)
        assert type(new) is nn.BatchNorm1d
        assert (new.affine, new.track_running_stats) == (layer.affine, layer.track_running_stats)
        assert (new.weight is None) == (not layer.affine)
        close(eval_out(new, x), eval_out(layer, x), 1e-5)

    # the sync layers become torch's SyncBatchNorm, with their process group
    group = object()  # stands for a process group; it is only stored
    for layer in (dbn.SyncBatchNorm(3, process_group=group),
                  dbn.SyncDiminishingBatchNorm(3, process_group=group, bias=False)):
        layer(torch.randn(5, 3, 4) + 2)  # no process group initialised: the local step
        layer.eval()
        x = torch.randn(5, 3, 4)
        new = dbn.revert(layer)
        assert type(new) is nn.SyncBatchNorm and new.process_group is group
        assert new.weight is layer.weight and new.bias is layer.bias
        close(eval_out(new, x), eval_out(layer, x), 1e-5)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("kind", ["bn", "dbn", "dbn-running"])
def test_revert_then_fold(kind, dims):
    """The three ways torch folds batch norm into the convolution before it give the
    unreverted model's eval output once reverted."""
    model = conv_net(kind, dims, bias=dims != 2)
    x = _inputs(dims, batch=5)
    expected = eval_out(model, x)
    reverted = dbn.revert(copy.deepcopy(model))
    with torch.no_grad():
        folded = fuse_conv_bn_eval(reverted[0], reverted[1])
        rest = fuse_conv_bn_eval(reverted[3], reverted[4])
        close(rest(reverted[2](folded(x))), expected, 1e-5)
        fused = fx_fuse(reverted)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
        close(fused(x), expected, 1e-5)
        fused = torch.ao.quantization.fuse_modules(copy.deepcopy(reverted),
                                                   [["0", "1", "2"], ["3", "4"]])
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
        close(fused(x), expected, 1e-5)


# ---- torch.fx without revert -------------------------------------------------------------


def _mixed_net(kind):
    """2d and 1d layers, one of them without bias."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 5, 6), torch_norm(nn.BatchNorm1d, 6, bias=False))
    return dbn.convert(model, **KINDS[kind])


def _buffers(model):
    return {name: b.clone() for name, b in model.named_buffers()}


@pytest.mark.parametrize("kind", ["bn", "dbn"])
def test_fx_trace_keeps_each_layer_as_one_dynamic_node(kind):
    eager = _mixed_net(kind)
    traced = torch.fx.symbolic_trace(copy.deepcopy(eager))
    layers = [n for n in traced.graph.nodes if n.op == "call_module"
              and isinstance(traced.get_submodule(n.target), dbn.modules._ProjectNorm)]
    assert [n.target for n in layers] == ["1", "5"]
    assert all(n.op != "call_function" or "dbn" not in str(n.target) for n in traced.graph.nodes)

    # training in the traced module steps exactly like eager: outputs, gradients, buffers
    start = _buffers(traced)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, traced)]
    for step in range(3):
        x = _inputs(2) * (1 + step)
        outs = []
        for model, opt in zip((eager, traced), opts):
            out = model(x)
            opt.zero_grad()
            out.square().mean().backward()
            opt.step()
            outs.append(out.detach())
        close(outs[1], outs[0], 0)
        for (name, b), (_, t) in zip(_buffers(eager).items(), _buffers(traced).items()):
            close(t, b, 0)
    # ... and the traced module's buffers did move (not frozen into the graph)
    for name, b in _buffers(traced).items():
        assert (b != start[name]).all(), name

    # .eval() on the GraphModule switches the layers: eval output, buffers untouched
    traced.eval()
    eager.eval()
    assert not traced.get_submodule("1").training
    x = _inputs(2)
    frozen = _buffers(traced)
    close(eval_out(traced, x), eval_out(eager, x), 0)
    for name, b in _buffers(traced).items():
        close(b, frozen[name], 0)


def test_fx_trace_of_a_bare_layer_says_what_to_do():
    with pytest.raises(RuntimeError, match=r"inside a module that holds it"):
        torch.fx.symbolic_trace(dbn.DiminishingBatchNorm2d(3))
    layer = dbn.DiminishingBatchNorm2d(3)
    traced = torch.fx.symbolic_trace(nn.Sequential(layer))
    traced(_inputs(2))
    assert int(layer.num_batches_tracked) == 1
    x = _inputs(2)
    close(eval_out(traced.eval(), x), eval_out(layer, x), 0)


@pytest.mark.parametrize("kind", ["bn", "dbn"])
def test_fx_fuse_without_revert_leaves_the_layers(kind):
    """torch.fx's fuse matches exact types: the project's layers stay, and stay right."""
    model = conv_net(kind)
    x = _inputs(2)
    fused = fx_fuse(model)
    assert type(fused.get_submodule("1")) is type(model[1])
    close(eval_out(fused, x), eval_out(model, x), 0)


# ---- ONNX ----------------------------------------------------------------------------------


def _onnx_run(model, x, exporter):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    with quiet():
        if exporter == "dynamo":
            pytest.importorskip("onnxscript")
            data = torch.onnx.export(model, (x,), dynamo=True, verbose=False) \
                .model_proto.SerializeToString()
        else:
            f = io.BytesIO()
            torch.onnx.export(model, (x,), f, dynamo=False)
            data = f.getvalue()
    proto = onnx.load_from_string(data)
    domains = {n.domain for n in proto.graph.node}
    assert domains <= {"", "ai.onnx"}, domains  # standard ops only
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    fresh = torch.randn_like(x) * 2 + 0.5  # not the example the export traced
    out = session.run(None, {session.get_inputs()[0].name: fresh.contiguous().numpy()})[0]
    return torch.from_numpy(out), fresh


# (kind, dims, memory format, revert first)
ONNX_CASES = [("bn", 2, None, False), ("dbn", 2, torch.channels_last, False),
              ("dbn-running", 1, None, False), ("dbn", 3, torch.channels_last_3d, False),
              ("dbn", 2, None, True)]


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("case", ONNX_CASES,
                         ids=lambda c: f"{c[0]}-{c[1]}d{'-cl' if c[2] else ''}"
                                       f"{'-reverted' if c[3] else ''}")
def test_onnx_export_runs_in_onnxruntime(case, exporter):
    kind, dims, memory_format, revert = case
    model = conv_net(kind, dims, bias=dims != 2)
    x = _inputs(dims, batch=4, memory_format=memory_format)
    to_export = dbn.revert(copy.deepcopy(model)) if revert else model
    out, fresh = _onnx_run(to_export, x, exporter)
    close(out, eval_out(model, fresh), 1e-4)
    assert not model.training  # the export left the mode alone


def test_onnx_training_export_names_revert():
    model = conv_net("dbn").train()
    with pytest.raises(RuntimeError, match=r"dbn_kernels\.revert"), quiet():
        torch.onnx.export(model, (_inputs(2),), io.BytesIO(), dynamo=False,
                          training=torch.onnx.TrainingMode.TRAINING)


# ---- TorchScript ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_script_reverted_model_matches(kind):
    model = conv_net(kind, bias=False)
    x = _inputs(2)
    with quiet():
        scripted = torch.jit.script(dbn.revert(copy.deepcopy(model)))
    close(eval_out(scripted, x), eval_out(model, x), 1e-5)


@pytest.mark.parametrize("layer", [dbn.BatchNorm2d(3), dbn.DiminishingBatchNorm1d(3),
                                   dbn.SyncDiminishingBatchNorm(3)],
                         ids=lambda m: type(m).__name__)
def test_script_unreverted_names_revert(layer):
    with pytest.raises(RuntimeError, match=r"dbn_kernels\.revert\(model\)"), quiet():
        torch.jit.script(nn.Sequential(nn.Identity(), layer))


# ---- torch.jit.trace and torch.export: no dbn_kernels needed to run the result -------------


def test_trace_and_export_run_without_dbn_kernels(tmp_path):
    models = {kind: conv_net(kind) for kind in KINDS}
    x = _inputs(2, batch=4, memory_format=torch.channels_last)
    fresh = _inputs(2, batch=3)
    torch.save(fresh, tmp_path / "fresh.pt")
    for kind, model in models.items():
        with quiet():
            traced = torch.jit.trace(model, x)
        assert "dbn::" not in str(traced.inlined_graph)
        close(eval_out(traced, fresh), eval_out(model, fresh), 1e-5)
        traced.save(str(tmp_path / f"{kind}.jit.pt"))

        # a symbolic batch size: the eval step has no shape-dependent branch
        program = torch.export.export(model, (x,),
                                      dynamic_shapes=({0: torch.export.Dim("batch")},))
        namespaces = {n.target.namespace for n in program.graph.nodes
                      if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)}
        assert namespaces == {"aten"}, namespaces
        close(program.module()(fresh), eval_out(model, fresh), 1e-5)
        torch.export.save(program, tmp_path / f"{kind}.pt2")

    # a fresh interpreter that never imports dbn_kernels loads and runs both
    script = textwrap.dedent("""
        import sys, torch
        d = sys.argv[1]
        fresh = torch.load(d + "/fresh.pt")
        for kind in sys.argv[2:]:
            with torch.no_grad():
                torch.save(torch.jit.load(d + f"/{kind}.jit.pt")(fresh), d + f"/{kind}.jit.out")
                program = torch.export.load(d + f"/{kind}.pt2")
                torch.save(program.module()(fresh), d + f"/{kind}.pt2.out")
        assert "dbn_kernels" not in sys.modules, "dbn_kernels was imported"
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path), *models],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for kind, model in models.items():
        expected = eval_out(model, fresh)
        close(torch.load(tmp_path / f"{kind}.jit.out"), expected, 1e-5)
        close(torch.load(tmp_path / f"{kind}.pt2.out"), expected, 1e-5)


def test_compile_keeps_the_project_ops_in_eval():
    """The export check must not catch torch.compile (torch 2.11's is_exporting() is True
    inside any compiled code): a compiled eval step still calls the project's op."""
    model = conv_net("dbn")
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=record, fullgraph=True)
    x = _inputs(2)
    close(eval_out(compiled, x), eval_out(model, x), 1e-5)
    assert any("dbn" in str(n.target) for gm in graphs for n in gm.graph.nodes)
    assert not any("batch_norm" in str(n.target) for gm in graphs for n in gm.graph.nodes)
