"""Compare two pytest --junitxml runs test by test: the tests present in both (matched by module and name, or by
name alone where it is unique), their summed times before and after, and the largest changes.
  python tests/experiments/compare_durations.py OLD.xml NEW.xml
"""
import collections
import sys
import xml.etree.ElementTree as ET


def load(p):
    d={}
    for tc in ET.parse(p).getroot().iter('testcase'):
        d[(tc.get('classname'),tc.get('name'))]=float(tc.get('time'))
    return d
o, n = load(sys.argv[1]), load(sys.argv[2])
byname=collections.defaultdict(list)
for k in n: byname[k[1]].append(k)
pairs=[];unmatched=[]
for k,v in o.items():
    if k in n: pairs.append((k,v,n[k]))
    elif len(byname[k[1]])==1: pairs.append((byname[k[1]][0],v,n[byname[k[1]][0]]))
    else: unmatched.append((k,v))
so=sum(v for _,v,_ in pairs); sn=sum(w for _,_,w in pairs)
print(f"old total {sum(o.values()):.0f} new total {sum(n.values()):.0f}; matched {len(pairs)} tests: old {so:.0f} s new {sn:.0f} s; unmatched old {len(unmatched)} {sum(v for _,v in unmatched):.0f} s")
matched_new={k for k,_,_ in pairs}
print("new-only tests:", len(n)-len(matched_new), round(sum(v for k,v in n.items() if k not in matched_new)))
print("--- biggest increases")
for k,v,w in sorted(pairs,key=lambda p:p[1]-p[2])[:25]: print(f"{v:6.1f} -> {w:6.1f}  {k[0]}::{k[1]}")
print("--- biggest decreases")
for k,v,w in sorted(pairs,key=lambda p:p[2]-p[1])[:8]: print(f"{v:6.1f} -> {w:6.1f}  {k[0]}::{k[1]}")
print("--- unmatched old"); [print(f"{v:6.1f} {k}") for k,v in sorted(unmatched,key=lambda x:-x[1])[:10]]
print("--- biggest new-only")
for k,v in sorted(((k,v) for k,v in n.items() if k not in matched_new), key=lambda x:-x[1])[:25]: print(f"{v:6.1f} {k[0]}::{k[1]}")
