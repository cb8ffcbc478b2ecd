# ipcd's developer commands. Every target sets up what it needs: `make run` and
# `make test` work on a fresh machine (Debian, Python 3.11) with no virtualenv yet.

PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
DEV_CFG := etc/ipcd/dev.toml
STAMP   := $(VENV)/.installed

# The test suite starts thousands of short ipcctl processes: let Python cache bytecode
# even where the environment asks it not to, or each start recompiles ipcd from source.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: help venv run test lint typecheck pytest format clean install uninstall test-systemd

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

venv: $(STAMP)  ## create .venv and install ipcd with its development tools

# sysv_ipc is built from source: the PyPI wheel lacks semtimedop(), which bounded
# semaphore waits need (ipcd falls back to SIGALRM without it, but builds it properly here).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-binary sysv_ipc -e '.[dev]'
	@touch $@

run: $(STAMP)  ## run the daemon in the foreground on the development config (Ctrl-C stops it)
	@mkdir -p .run
	@# The same three lines as README.md's Quick start (tests/test_manpages.py checks it).
	@echo "ipcd: development daemon on $(DEV_CFG); in a second terminal try:"
	@echo "    $(BIN)/ipcctl -c $(DEV_CFG) submit echo hello --wait"
	@echo "    $(BIN)/ipcctl -c $(DEV_CFG) status"
	@echo "    $(BIN)/ipcctl -c $(DEV_CFG) logs -f"
	$(BIN)/ipcd -c $(DEV_CFG) run

test: lint typecheck pytest  ## lint, type checks and the whole test suite

lint: $(STAMP)  ## ruff check, ruff format --check and the import rules (lint-imports)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)  ## mypy --strict
	$(BIN)/mypy

# --hypothesis-show-statistics: the property-based (fuzz) tests say how many inputs they
# tried; the daemon fuzz test (tests/test_dispatch.py) prints its own count.
# As root the suite runs in an IPC namespace of its own (unshare --ipc): its daemons and
# its end-of-run leak check then see only the suite's objects, so two suites (or another
# ipcd) on one host never trip each other. Elsewhere it shares the host's namespace, and
# the leak check looks only at the keys the tests used (tests/conftest.py).
IPC_NS := $(shell unshare --ipc true 2>/dev/null && echo unshare --ipc)
pytest: $(STAMP)  ## the test suite
	$(IPC_NS) $(BIN)/pytest --hypothesis-show-statistics

# Interleaved raw-vs-ipcd rounds on this machine, a few minutes (bench/run.py lists the steps).
.PHONY: bench
bench: $(STAMP)  ## measure ipcd against the raw SysV IPC limit; table + bench/results/latest.json
	$(BIN)/python -m bench

format: $(STAMP)  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:  ## remove the virtualenv and development run files
	rm -rf $(VENV) .run .mypy_cache .ruff_cache

# --- Installing as a system service (README.md, "Install as a service") -----------------
# ipcd goes into a virtualenv of its own, OPTDIR, made with the system's Python, and
# `ipcd`/`ipcctl` are linked into $(PREFIX)/bin. The units and the etc/ files go under
# /etc: this is the administrator's local install, not a distribution package, and
# /usr/lib/systemd/system, /usr/lib/sysusers.d and /usr/lib/tmpfiles.d belong to the
# package manager. Under /etc the units also work on every distribution and take
# precedence over any packaged ipcd; local changes still go into drop-ins
# (`systemctl edit ipcd`). A packager sets UNITDIR, SYSUSERSDIR and TMPFILESDIR to the
# /usr/lib directories (and DESTDIR to a staging tree).
PREFIX        ?= /usr/local
DESTDIR       ?=
OPTDIR        ?= /opt/ipcd
UNITDIR       ?= /etc/systemd/system
SYSUSERSDIR   ?= /etc/sysusers.d
TMPFILESDIR   ?= /etc/tmpfiles.d
# The distribution's Python, not the first python3 in PATH: a pyenv or conda Python under
# /root or /home is out of the service's reach (ProtectHome=yes).
SYSTEM_PYTHON ?= /usr/bin/python3
# What pip installs into OPTDIR, and how. sysv_ipc is built from source, as for `make
# venv` (the PyPI wheel lacks semtimedop), which needs a C compiler and the Python headers
# (Debian: build-essential python3-dev). Offline, from a directory of wheels:
#   make install PIP_FLAGS='--no-index --find-links DIR' INSTALL_SPEC=ipcd
INSTALL_SPEC  ?= .
PIP_FLAGS     ?= --no-binary sysv_ipc
VENV_DEST     := $(DESTDIR)$(OPTDIR)
# The virtualenv's own pip by default (`python -m venv` runs ensurepip). `python -m pip`,
# not bin/pip: a staged bin/pip names $(OPTDIR), which is not there yet. With
# VENV_FLAGS=--without-pip PIP='OTHER-PIP --python $(VENV_DEST)/bin/python' a pip from
# elsewhere installs instead (pip >= 22.3); the VM test does, as ensurepip takes minutes
# under emulation.
VENV_FLAGS    ?=
PIP           ?= $(VENV_DEST)/bin/python -m pip
# The man pages and the bash completion go where man-db and bash-completion look for a
# local install's (/usr/local/share/...). The completion file is named for ipcctl, and a
# link named ipcd makes bash-completion load it for ipcd too.
MANDIR        ?= $(PREFIX)/share/man
COMPLETIONDIR ?= $(PREFIX)/share/bash-completion/completions
MAN_PAGES     := man/ipcctl.1 man/ipcd.toml.5 man/ipcd.8
# The PHP and C clients, where their READMEs and docs/php.md `require` them from
# (/usr/local/lib/ipcd/ipcd.php): plain files, for PHP scripts and C programs of any user.
CLIENTDIR     ?= $(PREFIX)/lib/ipcd
CLIENT_FILES  := clients/php/ipcd.php clients/php/ipcctl.php clients/c/ipcd-submit.c

install:  ## install as a system service (PREFIX=/usr/local, DESTDIR=): see README.md
	umask 022 && $(SYSTEM_PYTHON) -m venv $(VENV_FLAGS) $(VENV_DEST)
	umask 022 && $(PIP) install --quiet --disable-pip-version-check --upgrade \
	    $(PIP_FLAGS) $(INSTALL_SPEC)
	@# Staged in DESTDIR: the scripts' #! lines must name the final place.
	@if [ -n "$(DESTDIR)" ]; then \
	    grep -lI --null -e '$(VENV_DEST)' $(VENV_DEST)/bin/* $(VENV_DEST)/pyvenv.cfg \
	        | xargs -0r sed -i 's|$(VENV_DEST)|$(OPTDIR)|g'; fi
	install -d -m 0755 $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSUSERSDIR) \
	    $(DESTDIR)$(TMPFILESDIR) $(DESTDIR)/etc/logrotate.d $(DESTDIR)/etc/cron.d \
	    $(DESTDIR)/etc/ipcd $(VENV_DEST)/share/doc/ipcd $(DESTDIR)$(COMPLETIONDIR) \
	    $(addprefix $(DESTDIR)$(MANDIR)/man,1 5 8) $(DESTDIR)$(CLIENTDIR)
	ln -sfn $(OPTDIR)/bin/ipcd $(DESTDIR)$(PREFIX)/bin/ipcd
	ln -sfn $(OPTDIR)/bin/ipcctl $(DESTDIR)$(PREFIX)/bin/ipcctl
	for unit in ipcd.service ipcd@.service ipcd-metrics.service ipcd-metrics.timer; do \
	    sed 's|/opt/ipcd|$(OPTDIR)|g' systemd/$$unit > $(DESTDIR)$(UNITDIR)/$$unit && \
	    chmod 0644 $(DESTDIR)$(UNITDIR)/$$unit || exit 1; done
	install -m 0644 etc/sysusers.d/ipcd.conf $(DESTDIR)$(SYSUSERSDIR)/ipcd.conf
	install -m 0644 etc/tmpfiles.d/ipcd.conf $(DESTDIR)$(TMPFILESDIR)/ipcd.conf
	install -m 0644 etc/logrotate.d/ipcd $(DESTDIR)/etc/logrotate.d/ipcd
	install -m 0644 etc/cron.d/ipcd-example $(DESTDIR)/etc/cron.d/ipcd-example
	install -m 0644 README.md docs/*.md etc/ipcd/ipcd.toml etc/ipcd/instance.toml.example \
	    $(VENV_DEST)/share/doc/ipcd/
	for page in $(MAN_PAGES); do \
	    install -m 0644 $$page $(DESTDIR)$(MANDIR)/man$${page##*.}/ || exit 1; done
	install -m 0644 completion/ipcctl.bash $(DESTDIR)$(COMPLETIONDIR)/ipcctl
	install -m 0644 $(CLIENT_FILES) $(DESTDIR)$(CLIENTDIR)/
	ln -sfn ipcctl $(DESTDIR)$(COMPLETIONDIR)/ipcd
	@# Never overwrite a configuration: the shipped one is also in share/doc/ipcd.
	@if [ -e $(DESTDIR)/etc/ipcd/ipcd.toml ]; then \
	    echo "kept the existing $(DESTDIR)/etc/ipcd/ipcd.toml"; \
	else install -m 0644 etc/ipcd/ipcd.toml $(DESTDIR)/etc/ipcd/ipcd.toml && \
	    echo "installed $(DESTDIR)/etc/ipcd/ipcd.toml"; fi
	@# On the live system: the ipcd user and group, the directories and the key file now
	@# (not only at the next boot), and systemd told about the units.
	@if [ -z "$(DESTDIR)" ]; then \
	    systemd-sysusers $(SYSUSERSDIR)/ipcd.conf && \
	    systemd-tmpfiles --create $(TMPFILESDIR)/ipcd.conf || exit 1; \
	    if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi; \
	    echo "ipcd installed. Next: systemctl enable --now ipcd (or restart it, if it" \
	        "runs); usermod -aG ipcd USER for each user who submits jobs. Metrics for" \
	        "node_exporter: ipcd-metrics.timer (docs/operating.md, Metrics)"; fi

uninstall:  ## stop ipcd and remove what install put in place (keeps config, data, logs, user)
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
	    systemctl stop ipcd-metrics.timer ipcd.service 'ipcd@*.service' || true; fi
	for link in $(DESTDIR)$(PREFIX)/bin/ipcd $(DESTDIR)$(PREFIX)/bin/ipcctl; do \
	    case $$(readlink $$link) in $(OPTDIR)/bin/*) rm -f $$link ;; esac; done
	rm -f $(DESTDIR)$(UNITDIR)/ipcd.service $(DESTDIR)$(UNITDIR)/ipcd@.service \
	    $(DESTDIR)$(UNITDIR)/ipcd-metrics.service $(DESTDIR)$(UNITDIR)/ipcd-metrics.timer \
	    $(DESTDIR)$(UNITDIR)/*.wants/ipcd.service $(DESTDIR)$(UNITDIR)/*.wants/ipcd@*.service \
	    $(DESTDIR)$(UNITDIR)/*.wants/ipcd-metrics.timer \
	    $(DESTDIR)$(SYSUSERSDIR)/ipcd.conf $(DESTDIR)$(TMPFILESDIR)/ipcd.conf \
	    $(DESTDIR)/etc/logrotate.d/ipcd $(DESTDIR)/etc/cron.d/ipcd-example \
	    $(DESTDIR)$(MANDIR)/man1/ipcctl.1 $(DESTDIR)$(MANDIR)/man5/ipcd.toml.5 \
	    $(DESTDIR)$(MANDIR)/man8/ipcd.8 \
	    $(DESTDIR)$(COMPLETIONDIR)/ipcctl $(DESTDIR)$(COMPLETIONDIR)/ipcd \
	    $(addprefix $(DESTDIR)$(CLIENTDIR)/,$(notdir $(CLIENT_FILES)))
	rmdir $(DESTDIR)$(CLIENTDIR) 2>/dev/null || true
	rm -rf $(VENV_DEST)
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "ipcd uninstalled. Kept: /etc/ipcd, /var/lib/ipcd (the key file), /var/log/ipcd," \
	    "the ipcd user and group, and the IPC objects with any queued jobs (ipcs; ipcrm)."

test-systemd:  ## boot a Debian 12 VM (qemu), make install and drive ipcd with systemctl
	bash tests/systemd/run-vm-test.sh
