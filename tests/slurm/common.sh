# Settings shared by tests/slurm/up.sh and tests/slurm/down.sh (sourced by both).
CONF=/etc/slurm/slurm.conf
MARK="# vinehpc-testbed: written by tests/slurm/up.sh (tests/slurm/down.sh removes it)"
RUN=/run/vinehpc-slurm
SPOOL=/var/spool/vinehpc-slurm
LOGDIR=/var/log/vinehpc-slurm
TMPBASE=/tmp/vinehpc-slurm-tmp
LOCK=/run/vinehpc-slurm.lock
