"""MiniLM faithfulness curves (issue #24): the top-k heads by attribution(mean) as circuits, k in 0..72,
under zero / mean / resample ablation, 80 templated paraphrase triples (every 4th), CPR/CMD areas and
95% bootstrap intervals over prompts. Output: bench/results/minilm_faithfulness_curves.txt.

    OMP_NUM_THREADS=1 python bench/faithfulness_curves_minilm.py
"""
import time, torch, headint
import pandas as pd; pd.set_option("display.width",200)
from headint.models.minilm import load_minilm
from headint.tasks.paraphrase import paraphrase_batch, paraphrase_margin_metric
from headint.tasks.paraphrase_set import templated_triples
from headint.scans.faithfulness import faithfulness_curve, faithfulness_across
t0=time.time()
model,tok=load_minilm()
batch=paraphrase_batch(model,tok,templated_triples()[::4])  # 80 triples, every 4th
metric=paraphrase_margin_metric()
att=headint.attribution_scan(model,batch,None,metric,method="mean")
sizes=[0,4,8,12,18,24,36,48,60,72]
for abl in ["zero","mean","resample"]:
    c=faithfulness_curve(model,batch,att,metric,ablation=abl,sizes=sizes)
    fr=c.to_frame(1000)
    print(abl, {k:round(v,3) for k,v in c.areas(1000).items()}, flush=True)
    print(fr[["circuit","faithfulness","lo","hi","complement","per_prompt_q25","per_prompt_q75"]].round(3).to_string(), flush=True)
print("total", time.time()-t0)
