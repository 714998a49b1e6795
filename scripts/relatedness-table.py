#!/usr/bin/env python3
"""The relatedness table (markdown) from results/relatedness/{id,invert} and results/full: the
composition methods per library, with head only, full fine-tuning and LoRA from scratch of the
full run beside them; mean ± 95% t-interval over 5 seeds. Run from the repository root."""
import json, statistics as st, math
def load(p):
    return [json.loads(l) for l in open(p)]
full=[r for r in load('results/full/fewshot.jsonl')]
sets=[('4 related (plain MNIST)',load('results/relatedness/id/fewshot.jsonl')),('4 unrelated (inverted MNIST)',load('results/relatedness/invert/fewshot.jsonl')),('all 16',full)]
T={4:2.776,9:2.262,14:2.145,19:2.093}
def ci(v):
    m=st.mean(v); return m, T[len(v)-1]*st.stdev(v)/math.sqrt(len(v))
names={'Uniform':'uniform','Learned':'learned','Soups':'LoRA Soups'}
for kind in ['label shift','covariate shift','domain shift','task shift']:
    print(f'\n{kind}:\n')
    print('| library | method | K=1 | K=4 | K=16 |')
    print('|---|---|---:|---:|---:|')
    for lname, rs in sets:
        for meth in ['Uniform','Learned','Soups']:
            cells=[]
            for k in (1,4,16):
                v=[r['accuracy']*100 for r in rs if r['method']==meth and r['k']==k and r['kind']==kind and r['accuracy'] is not None]
                assert len(v)==5, (lname,meth,k,len(v))
                m,c=ci(v); cells.append(f'{m:.1f} ± {c:.1f}')
            print(f'| {lname} | {names[meth]} | '+' | '.join(cells)+' |')
    for meth,label in [('Head','head only'),('Full','full fine-tuning'),('Lora','LoRA from scratch')]:
        cells=[]
        for k in (1,4,16):
            v=[r['accuracy']*100 for r in full if r['method']==meth and r['k']==k and r['kind']==kind and r['accuracy'] is not None]
            m,c=ci(v); cells.append(f'{m:.1f} ± {c:.1f}')
        print(f'| — | {label} | '+' | '.join(cells)+' |')
