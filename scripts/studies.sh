#!/usr/bin/env bash
# The recipe search of issue #16: `nanomoe study` runs at a 10-minute budget on the TinyStories text,
# MoE and dense searched with the same candidates, then the winners at 10 minutes twice (at different
# times) and at 30 minutes. Timings are only meaningful on an otherwise idle machine.
#
#   bash scripts/studies.sh            # every study below, in order (several hours)
#   bash scripts/studies.sh optimizer  # one of them
#
# Each study writes studies/<name>/{study.json,study.md,study.png}; copy the tables into
# docs/training.md ("Studies") and the winners' figures into the README's results section.
set -euo pipefail
cd "$(dirname "$0")/.."
NANOMOE=${NANOMOE:-"${NANOMOE_VENV:-.venv}/bin/nanomoe"}
DATA=${DATA:-data/tinystories}
MINUTES=${MINUTES:-10}
[ -f "$DATA/meta.json" ] || "$NANOMOE" prepare --source ../shared/data/tinystories --out "$DATA"

# The search ran from the default recipe of its day, whose lr was 3e-3 (2e-3, the MoE's winner, since):
# every run gets lr=3e-3 unless it names its own.
study() {  # study NAME RUN...  (STUDY_ARGS: more options, e.g. "--rounds 20")
  local name=$1; shift
  "$NANOMOE" study --data "$DATA" --minutes "$MINUTES" --out "studies/$name-${MINUTES}min-$(date +%H%M)" \
      --set progress=false --set lr=3e-3 ${STUDY_ARGS:-} --runs "$@"
}

# One-factor screening at 5 minutes (what the time of one session allowed: ten runs in about an
# hour): each side from its best optimizer of the optimizer study, with learning rate, schedule and
# batch shape for both, the Muon split and a finer expert shape for the MoE.
screen()     { MINUTES=${SCREEN_MINUTES:-5} study screen tiny-moe tiny-moe:schedule=wsd tiny-moe:lr=6e-3 \
                 tiny-moe:optimizer=muon,muon_experts=false tiny-moe:n_experts=16,expert_hidden=256,top_k=4 \
                 tiny-moe:seq_len=128,batch_size=32 tiny-dense:optimizer=muon tiny-dense:optimizer=muon,schedule=wsd \
                 tiny-dense:optimizer=muon,lr=6e-3 tiny-dense:optimizer=muon,seq_len=128,batch_size=32; }
# The second screening (5 minutes): the levers the first left untested, from each side's best recipe
# (the default recipe, wsd; AdamW for the MoE, Muon for the dense twin): a lower learning rate and a
# doubled batch for both, a shared expert with top-1 routing (same active FLOPs) and aux-loss-free
# balancing for the MoE.
screen2()    { MINUTES=${SCREEN_MINUTES:-5} study screen2 tiny-moe tiny-moe:top_k=1,n_shared_experts=1 \
                 tiny-moe:aux_loss_coef=0,router_bias_update_rate=1e-3 tiny-moe:lr=2e-3 tiny-moe:batch_size=32 \
                 tiny-dense:optimizer=muon tiny-dense:optimizer=muon,lr=2e-3 tiny-dense:optimizer=muon,batch_size=32; }
# The third screening (5 minutes): Muon with fewer Newton-Schulz iterations, for both sides. The MoE's
# Newton-Schulz work is 4x the dense twin's (8 experts, top-2), which made Muon lose for it per second.
screen3()    { MINUTES=${SCREEN_MINUTES:-5} study screen3 tiny-moe:lr=2e-3 tiny-moe:optimizer=muon,muon_ns_steps=3 \
                 tiny-moe:optimizer=muon,muon_ns_steps=2 tiny-dense:optimizer=muon \
                 tiny-dense:optimizer=muon,muon_ns_steps=3 tiny-dense:optimizer=muon,muon_ns_steps=2; }
# The fourth screening (5 minutes), for both sides: model size, the lever the search had not moved (a
# 10-minute run sees ~3.5M tokens, few for a 7M-parameter model: fewer layers take more steps), and
# a longer decay (in the finals the two sides ran level until the decay, where the dense twin gained more).
screen4()    { MINUTES=${SCREEN_MINUTES:-5} study screen4 tiny-moe:lr=2e-3 tiny-moe:lr=2e-3,n_layer=4 \
                 tiny-moe:lr=2e-3,decay_frac=0.4 tiny-dense:optimizer=muon tiny-dense:optimizer=muon,n_layer=4 \
                 tiny-dense:optimizer=muon,decay_frac=0.4; }
# The size study (10 minutes, the issue's budget): smaller models, paired so each MoE candidate has its
# dense twin: 4 and 3 layers for both, and at 4 layers the MoE with top-1 Switch routing over the same
# 8 experts (half the active FFN, the same total) against a dense twin with that halved FFN.
size()       { study size tiny-moe:lr=2e-3,n_layer=4 tiny-moe:lr=2e-3,n_layer=3 \
                 tiny-moe:lr=2e-3,n_layer=4,top_k=1,router=switch tiny-dense:optimizer=muon,n_layer=4 \
                 tiny-dense:optimizer=muon,n_layer=3 tiny-dense:optimizer=muon,n_layer=4,ffn_hidden=512; }
# The second size study (10 minutes): the size study's winners were the smallest step on each side (3
# layers for the MoE, a 512-wide FFN at 4 layers for the dense twin), so both sides halve the FFN
# (the MoE's 8 experts 256 wide, top-2: the same active FFN as the dense 512) at 4 and 3 layers.
size2()      { STUDY_ARGS="--rounds 10" study size2 tiny-moe:lr=2e-3,n_layer=4,expert_hidden=256 \
                 tiny-moe:lr=2e-3,n_layer=3,expert_hidden=256 tiny-dense:optimizer=muon,n_layer=4,ffn_hidden=512 \
                 tiny-dense:optimizer=muon,n_layer=3,ffn_hidden=512; }
# The fifth screening (5 minutes): Muon for the MoE at the winning size. At 6 layers each expert's
# Newton-Schulz made Muon's step 1.27-1.54x AdamW's; budget-moe's expert matrices are a quarter of that size.
screen5()    { MINUTES=${SCREEN_MINUTES:-5} study screen5 budget-moe:lr=2e-3 budget-moe:optimizer=muon \
                 budget-dense:optimizer=muon; }
# The third size study (10 minutes): 2 layers for both sides (each size study so far found the
# smallest step best), and Muon for budget-moe now that its experts' Newton-Schulz runs batched
# (one product per iteration for all experts: 0.17 s of optimizer step became 0.11 s).
size3()      { STUDY_ARGS="--rounds 10" study size3 budget-moe:lr=2e-3 budget-moe:optimizer=muon \
                 budget-moe:lr=2e-3,n_layer=2 budget-dense:optimizer=muon budget-dense:optimizer=muon,n_layer=2; }
# The sixth screening (10 minutes): Muon won the size3 study for the MoE (-3.0% against AdamW), and
# its experts' Newton-Schulz is still a quarter of its step: half as many experts (4, top-2: half
# the matrices) and 3 iterations instead of 5, against the dense twin's best.
screen6()    { STUDY_ARGS="--rounds 10" study screen6 budget-moe:optimizer=muon budget-moe:optimizer=muon,n_experts=4 \
                 budget-moe:optimizer=muon,muon_ns_steps=3 budget-dense:optimizer=muon; }
# The budget final (10 minutes): the sixth screening's two MoE gains combined (4 experts, 3
# Newton-Schulz iterations) against the dense twin's best.
budget_final() { STUDY_ARGS="--rounds 10" study budget-final budget-moe:optimizer=muon,n_experts=4,muon_ns_steps=3 \
                   budget-dense:optimizer=muon; }
# The seventh screening (10 minutes): Muon's learning rate at the budget size, for both sides (at 6
# layers 6e-3 helped the dense twin with Muon, -1.3%; the budget presets had only run Muon at 3e-3),
# with each side's best at 3e-3 again, hours after the sixth screening; and for the MoE Muon on its
# attention only (its experts' Newton-Schulz is most of what Muon costs it; AdamW trains the experts).
screen7()    { STUDY_ARGS="--rounds 10" study screen7 budget-moe:optimizer=muon,muon_ns_steps=3 \
                 budget-moe:optimizer=muon,muon_ns_steps=3,lr=5e-3 budget-moe:optimizer=muon,muon_experts=false \
                 budget-dense:optimizer=muon budget-dense:optimizer=muon,lr=5e-3; }
# The eighth screening (10 minutes): the budget final's question again, in one study with both
# references (that final's measurement ran at a slow moment): 4 experts with 3 Newton-Schulz
# iterations against 8 with 3, and the dense twin's best.
screen8()    { STUDY_ARGS="--rounds 10" study screen8 budget-moe:optimizer=muon,muon_ns_steps=3 \
                 budget-moe:optimizer=muon,muon_ns_steps=3,n_experts=4 budget-dense:optimizer=muon; }
baseline()   { study baseline tiny-moe tiny-dense; }
optimizer()  { study optimizer tiny-moe tiny-moe:optimizer=muon tiny-dense tiny-dense:optimizer=muon; }
lr()         { study lr tiny-moe:lr=1e-3 tiny-moe:lr=6e-3 tiny-dense:lr=1e-3 tiny-dense:lr=6e-3; }
muon_lr()    { study muon-lr tiny-moe:optimizer=muon,lr=1e-3 tiny-moe:optimizer=muon,lr=6e-3 \
                 tiny-dense:optimizer=muon,lr=1e-3 tiny-dense:optimizer=muon,lr=6e-3; }
schedule()   { study schedule tiny-moe:schedule=wsd tiny-moe:schedule=wsd,decay_frac=0.4 \
                 tiny-dense:schedule=wsd tiny-dense:schedule=wsd,decay_frac=0.4; }
experts()    { study experts tiny-moe:n_experts=16,expert_hidden=256 tiny-moe:n_experts=16,expert_hidden=256,top_k=4 \
                 tiny-moe:n_experts=32,expert_hidden=128,top_k=4 tiny-moe:n_experts=4,expert_hidden=512; }
shared()     { study shared tiny-moe:top_k=1,n_shared_experts=1 \
                 tiny-moe:n_experts=16,expert_hidden=256,top_k=3,n_shared_experts=1; }
balancing()  { study balancing tiny-moe:aux_loss_coef=0,router_bias_update_rate=1e-3 \
                 tiny-moe:aux_loss_coef=0.001,router_bias_update_rate=1e-3; }
regularize() { study regularize tiny-moe:dropout=0.1 tiny-moe:weight_decay=0.0 \
                 tiny-dense:dropout=0.1 tiny-dense:weight_decay=0.0; }
shape()      { study shape tiny-moe:seq_len=128,batch_size=32 tiny-moe:batch_size=32 \
                 tiny-dense:seq_len=128,batch_size=32 tiny-dense:batch_size=32; }
# After the search: each side's best settings in WINNER_MOE / WINNER_DENSE, the final comparison
# twice at different times, then once at 30 minutes (MINUTES=30 bash scripts/studies.sh final).
# Two runs measured over 20 interleaved rounds: a 5-step median moves a two-run ratio by several percent.
# The winners (wsd for both, now the default recipe's schedule; AdamW at 2e-3 for the MoE, Muon at 3e-3
# for the dense twin).
final()      { STUDY_ARGS="--rounds 20" study final "${WINNER_MOE:-tiny-moe:lr=2e-3}" "${WINNER_DENSE:-tiny-dense:optimizer=muon}"; }

ALL=(baseline optimizer screen screen2 screen3 screen4 size size2 screen5 size3 screen6 budget_final screen7 screen8 lr muon_lr schedule experts shared balancing regularize shape final)
[ $# -gt 0 ] || set -- "${ALL[@]}"
for name in "$@"; do
  "$name"
done
