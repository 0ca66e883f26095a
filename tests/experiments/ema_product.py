"""How far is the factor EMA (EMA(B) EMA(A), what the target adapter holds) from the EMA of the LoRA update
itself (EMA(B A)), along a real toy tscd run? Relative Frobenius gap over all layers, every 25 steps."""
import sys, tempfile, torch
from stepdistill.config import load_config
from stepdistill.train.loop import Trainer

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 150
torch.set_num_threads(2)
cfg = load_config("configs/toy/tscd_hyper.yaml", [f"loop.max_steps={steps}", "loop.progress=false",
                                                   "loop.checkpoint_every=100000", "data.images=toy:2000"])
tr = Trainer(cfg, tempfile.mkdtemp())
tr.setup()
unet, decay = tr.built.nets.denoiser, cfg.method.ema_decay
def factors(adapter):
    mods = {}
    for n, m in unet.named_modules():
        if hasattr(m, "lora_A") and adapter in m.lora_A:
            mods[n] = (m.lora_B[adapter].weight.detach().flatten(1).double(), m.lora_A[adapter].weight.detach().flatten(1).double())
    return mods
def product(B, A):
    return B @ A
ema_prod = {n: product(B, A) for n, (B, A) in factors("target").items()}
for step in range(steps):
    tr.iteration(); tr.step += 1
    student = factors("student")
    for n, (B, A) in student.items():
        ema_prod[n].lerp_(product(B, A), 1 - decay)
    if (step + 1) % 25 == 0:
        target = factors("target")
        num = sum(((product(*target[n]) - ema_prod[n]) ** 2).sum() for n in ema_prod)
        den = sum((ema_prod[n] ** 2).sum() for n in ema_prod)
        stud = sum(((product(*student[n]) - ema_prod[n]) ** 2).sum() for n in ema_prod)
        print(f"step {step+1}: |EMA(B)EMA(A) - EMA(BA)| / |EMA(BA)| = {float((num/den).sqrt()):.4f}; "
              f"|BA - EMA(BA)| / |EMA(BA)| = {float((stud/den).sqrt()):.4f}", flush=True)
