#!/usr/bin/env bash
# The paper's Table 1 layout (docs/results.md, issue 36) from the runner's tables in benchmarks/results/:
# every cell measured so far, the bundle version that trained it, the reason for each missing one. Run from the
# bundle root; prints markdown.
set -euo pipefail
R=benchmarks/results
python benchmarks/table1.py \
    --table 1:$R/acdc_1labeled_tac_full_070.json 1:$R/acdc_1labeled_table1_uamt.json \
        1:$R/acdc_1labeled_default_full_070.json 1:$R/acdc_1labeled_default_norsl.json \
        1:$R/acdc_1labeled_table1_uamt_rsl.json 1:$R/acdc_1labeled_ls_bf16.json 1:$R/acdc_fs.json \
        1:$R/acdc_1labeled_mcsc.json 1:$R/acdc_1labeled_mcsc_lrb.json 1:$R/acdc_1labeled_cts.json \
        1:$R/acdc_1labeled_cps.json 1:$R/acdc_1labeled_cct_r.json \
        3:$R/acdc_3labeled_table1.json 3:$R/acdc_3labeled_table1_ls.json 3:$R/acdc_3labeled_w2s.json \
        3:$R/acdc_3labeled_default_norsl.json 3:$R/acdc_3labeled_ls_bf16.json \
        3:$R/acdc_3labeled_mcsc.json 3:$R/acdc_3labeled_mcsc_lrb.json 3:$R/acdc_3labeled_uamt_rsl.json \
        3:$R/acdc_3labeled_cts.json 3:$R/acdc_3labeled_cct_r.json \
        7:$R/acdc_7labeled_full.json 7:$R/acdc_7labeled_table1_cps.json \
        7:$R/acdc_7labeled_tac_full_070.json 7:$R/acdc_7labeled_default_norsl.json \
        7:$R/acdc_7labeled_ls_bf16.json 7:$R/acdc_7labeled_mcsc.json 7:$R/acdc_7labeled_uamt.json \
        7:$R/acdc_7labeled_uamt_rsl.json 7:$R/acdc_7labeled_cts_0100.json 7:$R/acdc_7labeled_cct_r.json \
    --registration 1:$R/acdc_1labeled_registration_only.csv 3:$R/acdc_3labeled_registration_only.csv \
        7:$R/acdc_7labeled_registration_only.csv \
    --rename default=default_rsl default_norsl=default \
    --only ls ls_bf16 uamt uamt_rsl cps cts mcsc mcsc_lrb registration_only cct_r default default_rsl fs \
    --paper $R/paper_table1.json \
    --version 1:ls=0.7.0 1:ls_bf16=0.10.0 1:uamt=0.6.0 1:uamt_rsl=0.7.0 1:cps=0.10.0 1:cts=0.10.0 1:mcsc=0.10.0 \
        1:mcsc_lrb=0.10.0 1:registration_only=0.9.0 1:cct_r=0.10.0 1:default=0.8.0 1:default_rsl=0.7.0 1:fs=0.10.0 \
        3:ls=0.7.0 3:ls_bf16=0.10.0 3:uamt=0.6.0 3:uamt_rsl=0.10.0 3:cps=0.6.0 3:cts=0.10.0 3:mcsc=0.10.0 \
        3:mcsc_lrb=0.10.0 3:registration_only=0.10.0 3:cct_r=0.10.0 3:default=0.8.0 3:default_rsl=0.5.0 \
        7:ls=0.7.0 7:ls_bf16=0.9.0 7:uamt=0.10.0 7:uamt_rsl=0.10.0 7:cps=0.7.0 7:cts=0.10.0 7:mcsc=0.10.0 \
        7:registration_only=0.10.0 7:cct_r=0.10.0 7:default=0.8.0 7:default_rsl=0.5.0 \
    --missing \
        "3:fs=see 1 labeled" \
        "7:fs=see 1 labeled" \
        "7:mcsc_lrb=not run (measured at 1 and 3 labeled patients to explain mcsc's rank)"
