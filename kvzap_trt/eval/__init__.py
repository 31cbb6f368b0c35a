"""Accuracy against compression (`kvzap-trt eval`): long-context tasks generated locally and
scored exactly (RULER-style), run through the engine under KVzap and under baselines at the
same compression (window only, random eviction at the same per-head rate, full cache).

sample.py     a Sample and its exact scorer
words.py      word lists the generators draw from (keys, names, common words)
haystack.py   noise and real-text haystacks, and fitting a prompt to a token length
niah.py       needle retrieval: single, multi-key, multi-value
vt.py         variable tracking
cwe.py        common-word extraction
qa.py         question answering over a long document with distractor paragraphs
tasks.py      the task table: name -> generator
baselines.py  window-only and random-eviction surrogates, matched to a KVzap run
runner.py     batches samples through the engine, per configuration
report.py     JSON, Markdown table and PNG, written atomically
"""
