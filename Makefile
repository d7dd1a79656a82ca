# Install docker-on-top as a socket-activated systemd service.
#
#   make                      build target/release/docker-on-top (cargo build --release)
#   sudo make install         install the binary and the units, enable and start the socket
#   sudo make uninstall       stop and disable, remove what install installed;
#                             never touches the volumes in /var/lib/docker-on-top
#   make plugin               build the managed-plugin bundle in target/plugin/ (config.json and
#                             rootfs/); then: docker plugin create docker-on-top target/plugin
#   make plugin-tar           the same, and target/docker-on-top-plugin.tar.gz to copy elsewhere
#   make generated            write dist/man/*.8 and dist/completions/* again from the
#                             binary's clap definitions (tests/units.rs checks they are current)
#
# PREFIX (default /usr/local) decides where everything goes: the binary (BINDIR), the units
# (UNITDIR, $(PREFIX)/lib/systemd/system: systemd reads /usr/local/lib/systemd/system, and
# /etc/systemd/system stays the administrator's), the README (DOCDIR), the man pages (MANDIR)
# and the bash, zsh and fish completions. The installed service's ExecStart and
# Documentation= follow BINDIR and DOCDIR. DESTDIR stages the files elsewhere (for packaging)
# and skips systemctl.

PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
UNITDIR ?= $(PREFIX)/lib/systemd/system
DOCDIR ?= $(PREFIX)/share/doc/docker-on-top
MANDIR ?= $(PREFIX)/share/man/man8
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
# zsh's fpath: Debian's zsh reads /usr/local/share/zsh/site-functions (its own packages use
# /usr/share/zsh/vendor-completions).
ZSHCOMPDIR ?= $(PREFIX)/share/zsh/site-functions
FISHCOMPDIR ?= $(PREFIX)/share/fish/vendor_completions.d
DESTDIR ?=
# The binary that install and plugin use: what `make` built, in CARGO_TARGET_DIR if set.
BIN ?= $(or $(CARGO_TARGET_DIR),target)/release/docker-on-top
STATE_DIR := /var/lib/docker-on-top
SYSTEMCTL ?= systemctl

MANPAGES := $(notdir $(wildcard dist/man/*.8))

.PHONY: all build install uninstall generated plugin plugin-tar

all: build

build:
	cargo build --release --locked

plugin: build
	scripts/plugin-bundle "$(BIN)" target/plugin

plugin-tar: build
	scripts/plugin-bundle "$(BIN)" target/plugin target/docker-on-top-plugin.tar.gz

generated:
	@test -x "$(BIN)" || { echo "make generated: $(BIN) is missing: run 'make' first" >&2; exit 1; }
	rm -f dist/man/*.8 dist/completions/*
	"$(BIN)" generate man dist/man
	"$(BIN)" generate completions dist/completions

install:
	@test -x "$(BIN)" || { echo "make install: $(BIN) is missing: run 'make' (or cargo build --release) first" >&2; exit 1; }
	install -d "$(DESTDIR)$(BINDIR)" "$(DESTDIR)$(UNITDIR)" "$(DESTDIR)$(DOCDIR)" "$(DESTDIR)$(MANDIR)" \
		"$(DESTDIR)$(BASHCOMPDIR)" "$(DESTDIR)$(ZSHCOMPDIR)" "$(DESTDIR)$(FISHCOMPDIR)"
	install -m 0755 "$(BIN)" "$(DESTDIR)$(BINDIR)/docker-on-top"
	install -m 0644 README.md "$(DESTDIR)$(DOCDIR)/README.md"
	install -m 0644 $(addprefix dist/man/,$(MANPAGES)) "$(DESTDIR)$(MANDIR)/"
	sed -e 's|/usr/share/doc/docker-on-top/|$(DOCDIR)/|' dist/man/docker-on-top.8 \
		> "$(DESTDIR)$(MANDIR)/docker-on-top.8"
	install -m 0644 dist/completions/docker-on-top.bash "$(DESTDIR)$(BASHCOMPDIR)/docker-on-top"
	install -m 0644 dist/completions/_docker-on-top "$(DESTDIR)$(ZSHCOMPDIR)/_docker-on-top"
	install -m 0644 dist/completions/docker-on-top.fish "$(DESTDIR)$(FISHCOMPDIR)/docker-on-top.fish"
	sed -e 's|^ExecStart=/usr/local/bin/docker-on-top|ExecStart=$(BINDIR)/docker-on-top|' \
		-e 's|^Documentation=file:///usr/local/share/doc/docker-on-top/|Documentation=file://$(DOCDIR)/|' \
		docker-on-top.service > "$(DESTDIR)$(UNITDIR)/docker-on-top.service"
	chmod 0644 "$(DESTDIR)$(UNITDIR)/docker-on-top.service"
	install -m 0644 docker-on-top.socket "$(DESTDIR)$(UNITDIR)/docker-on-top.socket"
	@if [ -z "$(DESTDIR)" ]; then \
		set -x; \
		$(SYSTEMCTL) daemon-reload && \
		$(SYSTEMCTL) enable --now docker-on-top.socket && \
		$(SYSTEMCTL) try-restart docker-on-top.service; \
	else \
		echo "DESTDIR set: not running systemctl"; \
	fi

uninstall:
	@if [ -z "$(DESTDIR)" ]; then \
		set -x; \
		$(SYSTEMCTL) disable --now docker-on-top.socket docker-on-top.service || true; \
	fi
	rm -f "$(DESTDIR)$(UNITDIR)/docker-on-top.service" "$(DESTDIR)$(UNITDIR)/docker-on-top.socket"
	rm -f "$(DESTDIR)$(BINDIR)/docker-on-top" "$(DESTDIR)$(DOCDIR)/README.md"
	rm -f $(addprefix "$(DESTDIR)$(MANDIR)/,$(addsuffix ",$(MANPAGES)))
	rm -f "$(DESTDIR)$(BASHCOMPDIR)/docker-on-top" "$(DESTDIR)$(ZSHCOMPDIR)/_docker-on-top" \
		"$(DESTDIR)$(FISHCOMPDIR)/docker-on-top.fish"
	rmdir "$(DESTDIR)$(DOCDIR)" 2>/dev/null || true
	@if [ -z "$(DESTDIR)" ]; then set -x; $(SYSTEMCTL) daemon-reload; fi
	@echo "make uninstall: kept $(STATE_DIR) (the volumes and their changes); delete it yourself once you are sure nothing in it is needed"
