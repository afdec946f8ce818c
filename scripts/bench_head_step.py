"""Benchmark: one training step of conv_egemaps's head (params.yaml settings) on one thread, FastDropout against
nn.Dropout, then a profile of the step's operators. Usage: python scripts/bench_head_step.py"""
import time, torch
from torch import nn
from heads.models import build_head
torch.set_num_threads(1)
torch.manual_seed(0)
def run(drop_cls=None, n=30):
    m = build_head("conv", num_layers=1, input_dim=25, num_classes=8, hidden=256, dropout=0.5, pooling="stats")
    if drop_cls:
        for name, mod in m.named_modules():
            for cn, c in mod.named_children():
                if type(c).__name__ == "FastDropout":
                    setattr(mod, cn, nn.Dropout(0.5))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.05)
    x = torch.randn(32, 1, 300, 25); L = torch.full((32,), 300); y = torch.randint(0, 8, (32,))
    loss = nn.CrossEntropyLoss()
    for i in range(5):
        opt.zero_grad(); loss(m(x, L), y).backward(); opt.step()
    t = time.perf_counter()
    for i in range(n):
        opt.zero_grad(); loss(m(x, L), y).backward(); opt.step()
    return (time.perf_counter() - t) / n
for rep in range(2):
    print("FastDropout %.1f ms/step   nn.Dropout %.1f ms/step" % (run() * 1e3, run(True) * 1e3))
m = build_head("conv", num_layers=1, input_dim=25, num_classes=8, hidden=256, dropout=0.5, pooling="stats")
opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
x = torch.randn(32, 1, 300, 25); L = torch.full((32,), 300); y = torch.randint(0, 8, (32,))
from torch.profiler import profile
with profile() as p:
    for i in range(10):
        opt.zero_grad(); nn.CrossEntropyLoss()(m(x, L), y).backward(); opt.step()
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
