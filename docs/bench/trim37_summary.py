import json, sys, statistics as st
runs = [(a, json.load(open(a))) for a in sys.argv[1:]]
fams = [f['family'] for f in runs[0][1]['families']]
print("%-20s" % "family" + "".join("| %-34s" % r[0][-14:] for r in runs))
print("%-20s" % "" + "".join("| page cpu  mass | token cpu mass   " for r in runs))
tot = {r[0]: [[], [], [], []] for r in runs}
for fam in fams:
    line = "%-20s" % fam
    for name, d in runs:
        f = [x for x in d['families'] if x['family'] == fam][0]
        p = f['calibrated_width']; t = f['calibrated_width_token']
        tok_orc = f['policies']['exact/token']['mass_recall']
        pm = p['replay_mass'] / p['replay_page_oracle_mass']; tm = t['replay_mass'] / tok_orc
        line += "| %6.1f %6.3f | %6.1f %6.3f   " % (p['replay_select_cpu_us_mean'], pm, t['replay_select_cpu_us_mean'], tm)
        for i, v in enumerate([p['replay_select_cpu_us_mean'], pm, t['replay_select_cpu_us_mean'], tm]): tot[name][i].append(v)
    print(line)
line = "%-20s" % "median/min mass"
for name, _ in runs:
    v = tot[name]
    line += "| %6.1f %6.3f | %6.1f %6.3f   " % (st.median(v[0]), min(v[1]), st.median(v[2]), min(v[3]))
print(line)
line = "%-20s" % "mean cpu"
for name, _ in runs:
    v = tot[name]
    line += "| %6.1f        | %6.1f          " % (st.mean(v[0]), st.mean(v[2]))
print(line)
