#!/usr/bin/env python3
"""The deployment files stay consistent with the binaries they start.

Parses deploy/kubernetes/*.yaml (every document) and deploy/systemd/*.service
and checks what an operator would otherwise find out on a cluster: the
embedded icecached config passes `icecached --check_config`, the flags the
manifests pass exist, the socket the probes use is the socket the config
binds and is on a mounted volume, and the grace period outlasts the drain.

usage: manifests_test.py SOURCE_DIR ICECACHED ICECACHECTL
"""
import configparser
import glob
import os
import re
import subprocess
import sys
import tempfile
import unittest

import yaml

SOURCE_DIR, ICECACHED, ICECACHECTL = sys.argv[1:4]
DEFAULT_DRAIN_S = 10  # drain_timeout_ms default (server/rpc/config.h)


def load_manifests():
    docs = []
    for path in sorted(glob.glob(os.path.join(SOURCE_DIR, "deploy/kubernetes/*.yaml"))):
        with open(path) as f:
            docs += [(path, d) for d in yaml.safe_load_all(f) if d is not None]
    return docs


def check_config(text, extra_args=()):
    with tempfile.NamedTemporaryFile("w", suffix=".textproto") as f:
        f.write(text)
        f.flush()
        return subprocess.run([ICECACHED, "--config=" + f.name, "--check_config", *extra_args],
                              capture_output=True, text=True, timeout=60)


def help_text(binary, *sub):
    out = subprocess.run([binary, *sub, "--help"], capture_output=True, text=True, timeout=60)
    return out.stdout + out.stderr


def flag_names(args):
    return [re.match(r"--([A-Za-z0-9_-]+)", a).group(1) for a in args if a.startswith("--")]


class KubernetesManifestsTest(unittest.TestCase):
    def setUp(self):
        self.docs = load_manifests()
        self.assertTrue(self.docs, "no manifests under deploy/kubernetes")
        self.by_kind = {}
        for path, d in self.docs:
            self.by_kind.setdefault(d["kind"], []).append(d)

    def test_every_document_names_its_kind_and_object(self):
        for path, d in self.docs:
            for key in ("apiVersion", "kind", "metadata"):
                self.assertIn(key, d, f"{path}: a document without {key}")
            self.assertTrue(d["metadata"].get("name"), f"{path}: {d['kind']} without a name")

    def daemonset(self):
        self.assertEqual(len(self.by_kind.get("DaemonSet", [])), 1)
        return self.by_kind["DaemonSet"][0]

    def container(self):
        return self.daemonset()["spec"]["template"]["spec"]["containers"][0]

    def config_text(self):
        maps = self.by_kind.get("ConfigMap", [])
        self.assertEqual(len(maps), 1)
        return maps[0]["data"]["icecached.textproto"]

    def test_the_embedded_config_is_valid(self):
        r = check_config(self.config_text())
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_daemon_flags_exist(self):
        known = help_text(ICECACHED)
        for name in flag_names(self.container()["args"]):
            self.assertIn(name, known, f"icecached has no --{name}")

    def test_probes_use_the_configured_socket_on_a_mounted_volume(self):
        sock = re.search(r'unix_socket:\s*"([^"]+)"', self.config_text()).group(1)
        mounts = [m["mountPath"] for m in self.container()["volumeMounts"]]
        self.assertTrue(any(sock.startswith(m.rstrip("/") + "/") for m in mounts),
                        f"socket {sock} is on none of the mounts {mounts}")
        for probe in ("readinessProbe", "livenessProbe"):
            cmd = self.container()[probe]["exec"]["command"]
            self.assertIn(f"--socket={sock}", cmd, probe)
            self.assertIn(cmd[-1], help_text(ICECACHECTL), f"{probe}: icecachectl {cmd[-1]}")

    def test_grace_period_outlasts_the_drain(self):
        grace = self.daemonset()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        m = re.search(r"drain_timeout_ms:\s*(\d+)", self.config_text())
        drain_s = int(m.group(1)) / 1000 if m else DEFAULT_DRAIN_S
        self.assertGreater(grace, drain_s)

    def test_client_buffers_share_the_nodes_dev_shm(self):
        spec = self.daemonset()["spec"]["template"]["spec"]
        self.assertTrue(spec.get("hostIPC"), "client buffers live in the node's /dev/shm")
        self.assertIn("/dev/shm", [m["mountPath"] for m in self.container()["volumeMounts"]])


class SystemdUnitTest(unittest.TestCase):
    def test_exec_start_flags_exist_and_stop_outlasts_the_drain(self):
        for path in glob.glob(os.path.join(SOURCE_DIR, "deploy/systemd/*.service")):
            unit = configparser.ConfigParser(strict=False, interpolation=None)
            unit.optionxform = str
            unit.read(path)
            exec_start = unit["Service"]["ExecStart"].split()
            known = help_text(ICECACHED)
            for name in flag_names(exec_start[1:]):
                self.assertIn(name, known, f"{path}: icecached has no --{name}")
            self.assertGreater(int(unit["Service"]["TimeoutStopSec"]), DEFAULT_DRAIN_S, path)

    def test_the_example_config_is_valid(self):
        with open(os.path.join(SOURCE_DIR, "deploy/icecached.textproto")) as f:
            r = check_config(f.read())
        self.assertEqual(r.returncode, 0, r.stderr)


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)
