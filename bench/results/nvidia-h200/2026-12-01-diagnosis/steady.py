import gc, time, warnings, torch, torch.nn.functional as F
from dbn_kernels.benchmark.resnet import resnet50
from dbn_kernels.benchmark.e2e import _variant_model
dev = torch.device("cuda")
torch.backends.cudnn.benchmark = True
base, _ = resnet50()
images = torch.randn(64, 3, 224, 224, device=dev).contiguous(memory_format=torch.channels_last)
labels = torch.randint(0, 1000, (64,), device=dev)
for variant in ["torch", "cuda-bn", "torch", "cuda-bn"]:
    model = _variant_model(base, variant).to(dev, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    res = {}
    for gc_on in (True, False):
        gc.enable() if gc_on else gc.disable()
        issue = []
        t0 = time.perf_counter()
        for _ in range(20):
            a = time.perf_counter(); step(); issue.append(time.perf_counter() - a)
        torch.cuda.synchronize()
        res[gc_on] = (1e3 * (time.perf_counter() - t0) / 20, 1e3 * sorted(issue)[10], 1e3 * max(issue))
    gc.enable()
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        step()
    torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    print(f"{variant}: steady ms/step, median issue, max issue: gc on {res[True]}, gc off {res[False]}; "
          f"sync warnings {len(w)}: {[str(x.message)[:80] for x in w][:3]}", flush=True)
    del model, opt
