# Sourced by the launch scripts' bash side: the teacher's DeepSpeed JSON for TEACHER, a MASTER_PORT (a free one
# unless given, so two jobs on one machine do not collide) and the DeepSpeed launcher with NUM_GPUS / HOSTFILE.
# The python side names the same JSONs through ds_distill.config.deepspeed.TEACHER_PLACEMENTS (a test keeps them equal).
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
