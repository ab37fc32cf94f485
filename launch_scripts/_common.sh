# Sourced by the launch scripts' bash side. Gives
#   TEACHER_DS  the teacher's DeepSpeed JSON for TEACHER=replicated|zero3|cpu|nvme (default replicated);
#   MASTER_PORT a free port unless given, so two jobs on one machine do not collide;
#   LAUNCHER    the DeepSpeed launcher, with NUM_GPUS and HOSTFILE when set;
#   run_args    for the multi-node scripts: the run as CONFIG=RUN.yaml or RECIPE=NAME (see below).
# The python side names the same JSONs through ds_distill.config.deepspeed.TEACHER_PLACEMENTS (a test keeps them equal).
TEACHER_GIVEN=${TEACHER:-}
TEACHER=${TEACHER:-replicated}
case "$TEACHER" in
  replicated) TEACHER_DS=ds_configs/teacher_replicated_bf16.json ;;
  zero3) TEACHER_DS=ds_configs/teacher_zero3_inference.json ;;
  cpu|nvme) TEACHER_DS=ds_configs/teacher_zero3_inference_${TEACHER}.json ;;
  *) echo "TEACHER must be replicated, zero3, cpu or nvme" >&2; exit 2 ;;
esac
MASTER_PORT=${MASTER_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
LAUNCHER=(deepspeed --master_port "$MASTER_PORT")
if [ -n "${NUM_GPUS:-}" ]; then LAUNCHER+=(--num_gpus "$NUM_GPUS"); fi
if [ -n "${HOSTFILE:-}" ]; then LAUNCHER+=(--hostfile "$HOSTFILE"); fi

# run_args VERB DEFAULT_RECIPE: sets RUN_ARGS (flags of `ds-distill VERB`, distill or chain) and OUTPUT for a run
# given either as
#   CONFIG=FILE.yaml  the file as written; ZERO_STAGE and TEACHER override it only when set; OUTPUT defaults to its
#                     output directory;
#   RECIPE=NAME       default DEFAULT_RECIPE; students under ZeRO-${ZERO_STAGE:-2}, the teacher placed by TEACHER,
#                     OUTPUT default runs/NAME.
# A run (distill) resumes with --resume=auto: the same command run again, or a requeued job, goes on from the
# newest complete checkpoint in OUTPUT (a chain always does).
run_args() {
  local verb=$1 keys="" output_key=train.output_dir
  if [ "$verb" = chain ]; then keys=defaults. output_key=output_dir; fi
  if [ -n "${CONFIG:-}" ]; then
    if [ -n "${RECIPE:-}" ]; then echo "set CONFIG or RECIPE, not both" >&2; exit 2; fi
    if [ ! -f "$CONFIG" ]; then echo "CONFIG=$CONFIG: no such file" >&2; exit 2; fi
    RUN_ARGS=(--config="$CONFIG")
    OUTPUT=${OUTPUT:-$(python3 -c 'import os, sys, yaml
tree = yaml.safe_load(open(sys.argv[1])) or {}
for key in sys.argv[2].split("."):
    tree = tree.get(key) or {}
# a path in the YAML is read from its folder (README, "Paths in a config"), a shipped recipe'"'"'s from here
recipe = os.path.realpath(sys.argv[1]).startswith(os.path.realpath(sys.argv[4]) + os.sep)
folder = "" if recipe else os.path.dirname(sys.argv[1])
print(os.path.join(folder, os.path.expanduser(tree)) if tree else "runs/" + sys.argv[3])' \
      "$CONFIG" "$output_key" "$verb" "$(dirname "${BASH_SOURCE[0]}")/../ds_distill/recipes")}
    if [ -n "${ZERO_STAGE:-}" ]; then RUN_ARGS+=(--${keys}student.deepspeed_config="ds_configs/student_zero${ZERO_STAGE}.json"); fi
    if [ -n "$TEACHER_GIVEN" ]; then RUN_ARGS+=(--${keys}teacher.deepspeed_config="$TEACHER_DS"); fi
  else
    RECIPE=${RECIPE:-$2}
    OUTPUT=${OUTPUT:-runs/${RECIPE}}
    RUN_ARGS=(--recipe="$RECIPE" --${keys}student.deepspeed_config="ds_configs/student_zero${ZERO_STAGE:-2}.json"
              --${keys}teacher.deepspeed_config="$TEACHER_DS")
  fi
  RUN_ARGS+=(--${output_key}="$OUTPUT")
  if [ "$verb" = distill ]; then RUN_ARGS+=(--resume=auto); fi
}
