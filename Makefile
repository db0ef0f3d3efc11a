# One entry point for people and CI. Every target bootstraps what it needs (venv, Docker
# engine, base images) itself; see molecule/shared/bootstrap.sh.
.PHONY: up down status test lint bootstrap bench faults load features converge-table

## up: bring up the local container stack and run site.yml against it (left running)
up:
	molecule/shared/local-stack.sh up

## down: remove the local container stack (and the fault suite's Redis-broker stack)
down:
	molecule/shared/local-stack.sh down
	CELERY_STACK_INVENTORY=$(REDIS_BROKER_STACK) molecule/shared/local-stack.sh down

## status: list the stack's containers
status:
	molecule/shared/local-stack.sh status

## test: lint and every Molecule scenario (what CI runs)
test:
	molecule/shared/test.sh

## lint: yamllint and ansible-lint only
lint:
	molecule/shared/test.sh lint

## bootstrap: venv, Docker engine and base images only
bootstrap:
	molecule/shared/bootstrap.sh

## bench: prefork vs threads on I/O- and CPU-bound tasks, on the running local stack (make up)
bench:
	. .venv/bin/activate && ansible-playbook playbooks/benchmark.yml -i inventories/local

## faults: the fault suite on the running local stack (make up), next to the original note's
## Redis-broker setup (brought up as a second small stack), one table row per fault
REDIS_BROKER_STACK = inventories/local-redis-broker
REDIS_BROKER_FAULTS = none,worker-restart,redis-restart,redis-restart,redis-restart,redis-host-crash,redis-host-crash,redis-host-crash
faults:
	CELERY_STACK_INVENTORY=$(REDIS_BROKER_STACK) molecule/shared/local-stack.sh up
	. .venv/bin/activate && python molecule/shared/faults/faults.py -i inventories/local \
	  -i $(REDIS_BROKER_STACK)=$(REDIS_BROKER_FAULTS)

## load: the load suite on the running local stack (make up): bursts per queue and pool with
## monitoring on and off and the health check at its defaults and the inventory's settings, then
## a soak; one table row each (about 25 min). Options: make load LOAD_ARGS="--soak-seconds 60"
load:
	. .venv/bin/activate && python molecule/shared/faults/load.py -i inventories/local $(LOAD_ARGS)

## features: the feature suite on the running local stack (make up): Celery's canvas, control and
## result features sent from the web host, with Redis results, then with rpc results, then on
## the original note's Redis-broker stack (brought up as for make faults); one table row each
features:
	. .venv/bin/activate && python molecule/shared/faults/features.py -i inventories/local
	. .venv/bin/activate && python molecule/shared/faults/features.py -i inventories/local --result-backend rpc
	CELERY_STACK_INVENTORY=$(REDIS_BROKER_STACK) molecule/shared/local-stack.sh up
	. .venv/bin/activate && python molecule/shared/faults/features.py -i $(REDIS_BROKER_STACK) --queue io

## converge-table: site.yml cold and warm with 1, 2, 4 and 8 worker hosts, one table row each
## (replaces the local stack; about 40 min)
converge-table:
	molecule/shared/bootstrap.sh
	. .venv/bin/activate && python molecule/shared/converge_scale.py
