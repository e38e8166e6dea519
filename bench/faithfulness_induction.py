"""induction-2l circuit faithfulness across ablation choices (issue #24): the 5-head induction circuit and
the 4-head zero-ablation minimum under zero / mean / resample / patch / last-position-only / edge-level
choices with 95% bootstrap intervals over 32 prompts, and curves (heads ranked by exact mean
ablation) with CPR / CMD areas.

    OMP_NUM_THREADS=1 python bench/faithfulness_induction.py
"""
import torch, headint
from headint.scans.faithfulness import faithfulness_across, faithfulness_curve, ranking_of
from headint.tasks.induction import induction_prompts
model = headint.models.load("induction-2l")
p = induction_prompts(32, seq_len=32, vocab=model.config.vocab_size, seed=3)
batch = {"input_ids": p.clean, "attention_mask": torch.ones_like(p.clean), "target": p.target, "contrast": p.contrast}
corrupt = dict(batch, input_ids=p.corrupted)
C={"induction5":[(0,0),(0,1),(1,0),(1,2),(1,3)], "min4_zero":[(0,0),(0,1),(1,2),(1,3)]}
fr,_=faithfulness_across(model,batch,C,choices=[dict(ablation="zero"),dict(ablation="mean"),dict(ablation="resample"),dict(ablation="patch",corrupt=corrupt),dict(ablation="mean",positions=[31]),dict(level="edge",source="mean",name="edge, mean"),dict(level="edge",source="corrupt",corrupt=corrupt,name="edge, corrupt")],n_boot=1000)
import pandas as pd; pd.set_option("display.width",200)
print(fr[["choice","circuit","faithfulness","lo","hi","complement","complement_lo","complement_hi","per_prompt_q25","per_prompt_q75"]].round(3).to_string())
ex=headint.scan(model,batch,"logit_diff",method="mean",progress=False)
for abl in ["zero","mean","resample"]:
    c=faithfulness_curve(model,batch,ex,ablation=abl)
    print(abl,{k:round(v,3) for k,v in c.areas(1000).items()})
