"""Session 31, descriptive probe: can ftw's target alignment tell wrong arithmetic answers from
right ones, when the wrong ones are clearly wrong?

The suite's wrong answers are off by ±1, ±2 or ±10 ("near"). Here a second kind is added,
"swapped": another question's correct answer. SmolLM2-135M + LoRA (the suite's r 8, alpha 16,
q/k/v/o), AdamW lr 1e-3, trained on 4 right answers a step; at steps 1, 3, 6, 9 and 12, 24
candidates (8 right, 8 near, 8 swapped) are scored by ftw's defaults against the gradient of 8
other right answers. Printed: each kind's mean cosine with the target (in ftw's metric), the
probability that a right answer's cosine exceeds a wrong one's (AUC; 0.5 = cannot tell), each
kind's mean loss, and ftw's 4 picks (0-7 right, 8-15 near, 16-23 swapped).

    python docs/benchmarks/s31-2026-12-03/s31_wrong_labels.py   (output: wrong-labels.txt)
"""
import random, sys, torch
from peft import LoraConfig, get_peft_model
from gradsift.models import load_model_and_tokenizer
from gradsift.records import Record
from gradsift.data import encode, collate
from gradsift.capture import per_sample_grads
from gradsift.optim_state import read_optimizer_state
from gradsift.select import SelectionContext, get_selector
from gradsift.sources.arithmetic import arithmetic_records
from gradsift.loss import per_sample_loss
torch.set_num_threads(1)
torch.manual_seed(0)
model, tok = load_model_and_tokenizer("smollm2-135m")
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj","k_proj","v_proj","o_proj"], lora_dropout=0.0)).train()
params = {n: p for n, p in model.named_parameters() if p.requires_grad}
opt = torch.optim.AdamW(params.values(), lr=1e-3)
rng = random.Random(7)
pool = arithmetic_records(rng, 400, noise_rate=0.0)
def enc(recs):
    ex = [encode(Record(r["id"], "arithmetic", "x", prompt=r["prompt"], response=r["response"]), tok, 40) for r in recs]
    return collate(ex, tok.pad_token_id)
def batch_loss(b):
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    return per_sample_loss(out.logits, b["labels"])
it = iter(pool)
def take(n): return [next(it) for _ in range(n)]
def auc(pos, neg):  # P(right cosine > wrong cosine)
    return sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))
results = {"near": [], "swapped": []}
for step in range(1, 13):
    if step in (1, 3, 6, 9, 12):
        base = take(24)
        right, near, swap = base[:8], [dict(r) for r in base[8:16]], [dict(r) for r in base[16:24]]
        for r in near: r["response"] = f" {r['correct_answer'] + rng.choice((-10,-2,-1,1,2,10))}"
        others = take(8)
        for r, o in zip(swap, others): r["response"] = f" {o['correct_answer']}"
        cands = per_sample_grads(model, enc(right + near + swap))
        names = cands.param_names
        tgt = take(8)
        g = torch.autograd.grad(batch_loss(enc(tgt)).mean(), [params[n] for n in names])
        target = dict(zip(names, g))
        state = read_optimizer_state(opt, model, names)
        sel = get_selector("ftw").select(SelectionContext(cands, target, state, 4, torch.Generator().manual_seed(0)))
        cos = sel.diagnostics["cosines"]
        with torch.no_grad(): losses = batch_loss(enc(right + near + swap)).tolist()
        c_r, c_n, c_s = cos[:8], cos[8:16], cos[16:]
        print(f"step {step}: mean cosine right {sum(c_r)/8:.3f} near {sum(c_n)/8:.3f} swapped {sum(c_s)/8:.3f}; "
              f"AUC right>near {auc(c_r,c_n):.2f} right>swapped {auc(c_r,c_s):.2f}; "
              f"loss right {sum(losses[:8])/8:.2f} near {sum(losses[8:16])/8:.2f} swapped {sum(losses[16:])/8:.2f}; "
              f"ftw picks {sorted(sel.indices.tolist())}", flush=True)
        opt.zero_grad()
    # one training step on 4 right answers
    b = enc(take(4))
    batch_loss(b).mean().backward(); opt.step(); opt.zero_grad()
