cd /work/main; . .venv/bin/activate; unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE
for r in 1 2 3 4; do for sc in $(shuf -e 10000 1000 0); do
  if [ $sc = 10000 ]; then python /tmp/s/spin_ab.py 2>&1 | grep RESULT; else GOMP_SPINCOUNT=$sc python /tmp/s/spin_ab.py 2>&1 | grep RESULT; fi
done; done
