"""Backend-generic checks that need a GPU: no host synchronisation, CUDA-graph capture and replay
of a training step, torch.compile, and agreement with the float64 reference, for every backend
that can run on CUDA. Skipped without a GPU (conftest)."""

import pytest
import torch

import dbn_kernels as dbn

pytestmark = pytest.mark.gpu


def _backends():
    if not torch.cuda.is_available():
        return ["reference"]
    return dbn.available_backends("cuda")


def _layer(backend, C=16, **kwargs):
    return dbn.DiminishingBatchNorm2d(C, alpha=dbn.inverse_power(1.0, scale=2.0), backend=backend,
                                      **kwargs).cuda()


@pytest.mark.parametrize("backend", _backends())
def test_no_host_synchronisation(backend):
    layer = _layer(backend)
    x = torch.randn(8, 16, 7, 7, device="cuda", requires_grad=True)
    layer(x).sum().backward()  # warm-up: lazy loading and compilation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            layer.train()
            layer(x).sum().backward()
            layer.eval()
            layer(x)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("backend", _backends())
def test_cuda_graph_capture_and_replay(backend):
    layer = _layer(backend)
    ref = _layer("reference")
    ref.load_state_dict(layer.state_dict())
    static_x = torch.randn(8, 16, 5, 5, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph, as CUDA graphs require
        for _ in range(2):
            layer(static_x)
            ref(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
    for _ in range(3):
        static_x.copy_(torch.randn_like(static_x) * 3 + 1)
        graph.replay()
        expected = ref(static_x)
        torch.testing.assert_close(static_y, expected, rtol=1e-4, atol=1e-4)
    # capture records without running: two warm-up steps and three replays on each side
    assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked) == 5
    torch.testing.assert_close(layer.dbn_mean, ref.dbn_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.dbn_std, ref.dbn_std, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.running_var, ref.running_var, rtol=1e-5, atol=1e-5)

@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_training_steps_against_float64_reference(backend, dtype, fmt):
    C = 1000 if backend != "reference" else 24
    layer = _layer(backend, C, momentum=None, dtype=torch.float32)
    ref = _layer("reference", C, momentum=None, dtype=torch.float64)
    for _ in range(4):
        x = (torch.randn(6, C, 7, 7, device="cuda") * 2 + 3).to(dtype).to(memory_format=fmt)
        g = torch.randn_like(x)
        xa, xb = x.clone().requires_grad_(), x.double().requires_grad_()
        ya, yb = layer(xa), ref(xb)
        ya.backward(g)
        yb.backward(g.double())
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        assert ya.is_contiguous(memory_format=fmt) and xa.grad.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(ya.double(), yb, rtol=tol, atol=tol)
        torch.testing.assert_close(xa.grad.double(), xb.grad, rtol=tol, atol=tol)
        for name in ("dbn_mean", "dbn_std", "running_mean", "running_var"):
            torch.testing.assert_close(getattr(layer, name).double(), getattr(ref, name),
                                       rtol=1e-4, atol=1e-5, msg=name)
        assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked)


@pytest.mark.parametrize("backend", _backends())
def test_compile_fullgraph_on_gpu(backend):
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), _layer(backend, 8), torch.nn.ReLU()).cuda()
    eager = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), _layer(backend, 8), torch.nn.ReLU()).cuda()
    eager.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True)
    for _ in range(3):
        x = torch.randn(4, 3, 9, 9, device="cuda")
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model[1].dbn_std, eager[1].dbn_std, rtol=1e-5, atol=1e-6)
