#!/usr/bin/env bash
# Submit one Spark stage of slimrec to Kubernetes, in cluster mode, with spark-on-k8s.conf.
#
#   infra/spark/submit-k8s.sh user_sequences --lake /lake --profile prod [--run-date YYYY-MM-DD]
#   infra/spark/submit-k8s.sh prompts --lake /lake --profile prod
#   infra/spark/submit-k8s.sh interactions --dataset /lake/incoming/2024-01-15 --lake /lake --profile prod
#
# JOB is a file of jobs/ without .py (it runs unchanged, from the image: local:///opt/slimrec/jobs/JOB.py);
# the rest are the job's own arguments (`slim stage` options). Environment: K8S_API (default: the
# in-cluster API server), SLIMREC_IMAGE (overrides the image), SPARK_SUBMIT (default: spark-submit).
set -euo pipefail

job="${1:?usage: submit-k8s.sh JOB [job arguments...]}"
shift
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
api="${K8S_API:-https://kubernetes.default.svc:443}"
extra=()
if [[ -n "${SLIMREC_IMAGE:-}" ]]; then
  extra+=(--conf "spark.kubernetes.container.image=${SLIMREC_IMAGE}")
fi

exec "${SPARK_SUBMIT:-spark-submit}" \
  --master "k8s://${api}" \
  --properties-file "${here}/spark-on-k8s.conf" \
  --name "slimrec-${job//_/-}" \
  "${extra[@]}" \
  "local:///opt/slimrec/jobs/${job}.py" "$@"
