#!/usr/bin/env python3
"""The relatedness table (markdown): the composition methods per library, with head only, full
fine-tuning and LoRA from scratch of the whole-library sweep beside them; mean ± 95%
t-interval over every (task, seed) of a task kind. Run from the repository root.

  python3 scripts/relatedness-table.py            vision: results/relatedness/{id,invert} and
                                                  results/full (5 seeds each, one task a kind)
  python3 scripts/relatedness-table.py --lang     language: results/relatedness-lang/{tweets,
                                                  supersense} and results/lang (covariate shift)

A cell with fewer values than its row's first cell says how many ("n = 4")."""
import json
import math
import statistics as st
import sys

T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
       9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 19: 2.093, 29: 2.045}


def load(p):
    return [json.loads(line) for line in open(p)]


def cell(rs, meth, k, kind):
    v = [r['accuracy'] * 100 for r in rs
         if r['method'] == meth and r['k'] == k and r['kind'] == kind and r['accuracy'] is not None]
    if len(v) < 2:
        return f'n = {len(v)}', len(v)
    m = st.mean(v)
    return f'{m:.1f} ± {T95[len(v) - 1] * st.stdev(v) / math.sqrt(len(v)):.1f}', len(v)


if '--lang' in sys.argv[1:]:
    whole = load('results/lang/fewshot.jsonl')
    sets = [('4 related (tweet domains)', load('results/relatedness-lang/tweets/fewshot.jsonl')),
            ('9 unrelated (supersenses)', load('results/relatedness-lang/supersense/fewshot.jsonl')),
            ('all 13', whole)]
    kinds = ['covariate shift']
else:
    whole = load('results/full/fewshot.jsonl')
    sets = [('4 related (plain MNIST)', load('results/relatedness/id/fewshot.jsonl')),
            ('4 unrelated (inverted MNIST)', load('results/relatedness/invert/fewshot.jsonl')),
            ('all 16', whole)]
    kinds = ['label shift', 'covariate shift', 'domain shift', 'task shift']
names = {'Uniform': 'uniform', 'Learned': 'learned', 'Soups': 'LoRA Soups'}
rows = [(lname, rs, meth, names[meth]) for lname, rs in sets for meth in names]
rows += [('—', whole, meth, label) for meth, label in
         [('Head', 'head only'), ('Full', 'full fine-tuning'), ('Lora', 'LoRA from scratch')]]
for kind in kinds:
    print(f'\n{kind}:\n')
    print('| library | method | K=1 | K=4 | K=16 | values a cell |')
    print('|---|---|---:|---:|---:|---:|')
    for lname, rs, meth, label in rows:
        cells = [cell(rs, meth, k, kind) for k in (1, 4, 16)]
        print(f'| {lname} | {label} | ' + ' | '.join(c for c, _ in cells) + f' | {cells[0][1]} |')
