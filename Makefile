# vdifs: `make mount` installs everything and mounts the embedded pool at
# $(MOUNTPOINT); `make test` installs everything and runs the whole suite.
# Both need root on Debian (apt packages, /dev/fuse, loop devices).

PYTHON ?= python3
VENV ?= .venv
MOUNTPOINT ?= /mnt/vdis
APT_PACKAGES = fuse3 libfuse3-dev pkg-config gcc python3-venv libisal-dev qemu-utils fio e2fsprogs attr util-linux iproute2 \
	qemu-system-x86 linux-image-cloud-amd64 busybox-static cpio
PYTEST_ARGS ?=

.PHONY: all deps venv install mount umount test soak test-unit bench clean

all: install

deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:" $$missing; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

$(VENV)/.installed: setup.cfg setup.py pyproject.toml vdifs/store/_verified.pyx
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	touch $@

venv: $(VENV)/.installed

install: deps venv
	@if [ "$$(id -u)" = 0 ]; then ln -sf "$(abspath $(VENV))/bin/vdifs" /usr/local/bin/vdifs; fi

mount: install
	$(VENV)/bin/vdifs mount $(MOUNTPOINT)
	@echo "vdifs is mounted at $(MOUNTPOINT); 'vdifs umount $(MOUNTPOINT)' to stop"

umount:
	$(VENV)/bin/vdifs umount $(MOUNTPOINT)

# VDIFS_REQUIRE_NATIVE: a test fails if the native read path (optional for
# pip) was not built, so the suite runs what users run.
test: install
	VDIFS_REQUIRE_NATIVE=1 $(VENV)/bin/python -m pytest $(PYTEST_ARGS) tests

soak: install
	VDIFS_SOAK_CYCLES=10 $(VENV)/bin/python -m pytest $(PYTEST_ARGS) -m soak tests

test-unit: venv
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS) tests/unit tests/pool tests/sim

bench: install
	bench/run.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis vdifs/store/_verified.c vdifs/store/*.so
