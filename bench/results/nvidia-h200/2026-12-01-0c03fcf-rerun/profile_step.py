"""Where a ResNet-50 bf16 channels_last training step spends host and device time, per variant."""
import sys, time, torch, torch.nn.functional as F
from torch.profiler import profile, ProfilerActivity
from dbn_kernels.benchmark.resnet import resnet50
from dbn_kernels.benchmark.e2e import _variant_model

dev = torch.device("cuda")
torch.backends.cudnn.benchmark = True
base, _ = resnet50()
images = torch.randn(64, 3, 224, 224, device=dev).contiguous(memory_format=torch.channels_last)
labels = torch.randint(0, 1000, (64,), device=dev)
for variant in sys.argv[1:]:
    model = _variant_model(base, variant).to(dev, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
    for _ in range(8):
        step()
    torch.cuda.synchronize()
    # host time to issue one step while the GPU is idle at its start, and the synchronized step
    t0 = time.perf_counter(); step(); t1 = time.perf_counter(); torch.cuda.synchronize(); t2 = time.perf_counter()
    n = 10
    t3 = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    t4 = time.perf_counter()
    print(f"## {variant}: issue {1e3*(t1-t0):.1f} ms, issue+finish {1e3*(t2-t0):.1f} ms, "
          f"steady {1e3*(t4-t3)/n:.1f} ms/step")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    print(ka.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
    del model, opt
    torch.cuda.empty_cache()
