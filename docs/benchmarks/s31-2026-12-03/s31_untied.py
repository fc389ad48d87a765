"""Session 31, descriptive probe: how many coordinates are fresh (``v̂' = 0``) when SmolLM2-135M
is fully fine-tuned with its embedding *untied* from the head, and what ftw's default scores
look like with them at ``1/ε`` (before ``a8bfbf2``) and filled (after).

SmolLM2 ties its embedding to the head, so its embedding gets a dense gradient; untying (the
head a copy of the embedding, so the model computes the same function) makes it behave like
most larger open models. Full fine-tuning, AdamW lr 1e-5, two steps on 4 records each of the
`verse` scenario's mixed stream; then 16 stream candidates and 8 target examples (the suite's built data,
seed 0), ftw's defaults at k = 4.

    python docs/benchmarks/s31-2026-12-03/s31_untied.py runs/quality-s30/verse/data   (output: untied.txt)

(the folder any ``bench.quality --suite steady --scenarios verse`` run builds, seed 0).
"""
import sys
from pathlib import Path

import torch

from gradsift import optim_state
from gradsift.capture import per_sample_grads
from gradsift.data import collate, read_examples
from gradsift.models import load_model_and_tokenizer
from gradsift.optim_state import read_optimizer_state
from gradsift.select import SelectionContext, get_selector

torch.set_num_threads(2)
data = Path(sys.argv[1])
model, tok = load_model_and_tokenizer("smollm2-135m")
model.config.tie_word_embeddings = False
model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
model.train()
params = dict(model.named_parameters())
opt = torch.optim.AdamW(params.values(), lr=1e-5)
stream, _ = read_examples(data / "stream.jsonl", tok, 40, limit=48)
target, _ = read_examples(data / "target.jsonl", tok, 40)
target = target[64:72]  # the suite's first target batch rows (the first 64 are held out)


def loss(examples):
    b = collate(examples, tok.pad_token_id)
    return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                 labels=b["labels"]).loss


for step in range(2):
    loss(stream[4 * step: 4 * step + 4]).backward()
    opt.step()
    opt.zero_grad()
cands_ex = stream[8:24]
cands = per_sample_grads(model, collate(cands_ex, tok.pad_token_id))
names = cands.param_names
g = torch.autograd.grad(loss(target), [params[n] for n in names])
tgrad = dict(zip(names, g, strict=True))
state = read_optimizer_state(opt, model, names)
ctx = SelectionContext(cands, tgrad, state, 4, torch.Generator().manual_seed(0))
new = get_selector("ftw").select(ctx)


def at_eps(moments, stand_in, names):  # the preconditioner before 8acd493
    return {n: 1.0 / moments[n].next_denominator(stand_in[n].float()) for n in names}, 0


fill = optim_state.next_step_preconditioner
import gradsift.select.ftw_selector as fs  # noqa: E402

fs.next_step_preconditioner = at_eps
old = get_selector("ftw").select(ctx)
fs.next_step_preconditioner = fill
seen = set()
for ex in stream[:8] + target:
    seen.update(ex.input_ids[:-1])
emb = "model.embed_tokens.weight"
print(f"fresh coordinates: {new.diagnostics['n_fresh']:,} "
      f"({new.diagnostics['n_fresh'] / params[emb].shape[1]:,.0f} embedding rows of "
      f"{params[emb].shape[0]:,}); tokens used so far: {len(seen)}")
novel = [len(set(ex.input_ids[:-1]) - seen) for ex in cands_ex]
print("candidates' tokens the run and the target batch have not used:", novel)
for name, sel in (("1/eps", old), ("filled", new)):
    cos = sel.diagnostics["cosines"]
    print(f"{name:7s} picks {sorted(sel.indices.tolist())}; cosines "
          + " ".join(f"{c:.4f}" for c in cos))
# b is the same under both (ĝ = 0 on fresh coordinates), so a candidate's norm in the metric
# grows by (cos_filled / cos_at_eps)² at 1/ε
ratio = [(c_new / c_old) ** 2 if c_old else float("nan")
         for c_new, c_old in zip(new.diagnostics["cosines"], old.diagnostics["cosines"])]
print("norm in the metric at 1/eps over filled, per candidate:",
      " ".join(f"{r:.3g}" for r in ratio))
