"""Run a Kubernetes Indexed Job's pods as local processes, each in its own network namespace.

No kubelet can run here, so this plays the parts of the Job controller, the kubelet and cluster DNS
for the manifests `tprun render k8s` writes, and nothing else. For each completion index i:
- the container's command and env come from the Job manifest; downward-API fields are resolved,
  JOB_COMPLETION_INDEX is set, as the Job controller and kubelet do;
- the pod gets its own network namespace (a veth on a bridge, its own IP, its net.* sysctls), UTS namespace (hostname
  `<job>-<i>`) and mount namespace: its own /etc/hosts and /etc/resolv.conf, the ConfigMap at its
  mount path, PVC volumes bind-mounted from local directories, emptyDirs as tmpfs, a read-only root
  filesystem when the manifest asks for one, and the securityContext's uid, gid and groups;
- cluster DNS is a hosts file: a pod always resolves its own name (the kubelet's /etc/hosts entry);
  the `<pod>.<service>` names of all pods appear once that pod is "published", which a test can
  delay (pods start before their DNS records exist).
Needs root, `ip` (iproute2), and nsenter/unshare/setpriv (util-linux).
"""

from __future__ import annotations

import ipaddress
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

CLUSTER_DOMAIN = "cluster.local"
PREFIX = "tpk8s"


def available() -> str | None:
    """Why local pods cannot run here, or None."""
    if os.geteuid() != 0:
        return "local pods need root (network and mount namespaces)"
    missing = [t for t in ("ip", "nsenter", "unshare", "setpriv", "mount") if shutil.which(t) is None]
    if missing:
        return f"local pods need {', '.join(missing)} (apt-get install iproute2 util-linux mount)"
    return None


@dataclass
class Pod:
    index: int
    name: str
    hostname: str
    ip: str
    netns: str
    root: Path  # this pod's files: hosts, resolv.conf, log
    proc: subprocess.Popen | None = None

    @property
    def log(self) -> Path:
        return self.root / "log"


@dataclass
class LocalPods:
    docs: list[dict]
    volumes: dict[str, Path]  # PVC / hostPath volume name -> local directory
    workdir: Path
    command: list[str] | None = None  # replaces the container's command (smoke tests)
    path: str = f"{Path(__file__).resolve().parents[1] / '.venv' / 'bin'}:/usr/local/bin:/usr/bin:/bin"
    pods: list[Pod] = field(default_factory=list)
    published: set[int] = field(default_factory=set)
    _made_dirs: list[Path] = field(default_factory=list)
    _links: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        kinds = {d["kind"]: d for d in self.docs}
        # A LeaderWorkerSet (independent groups) plays the Job's part: replicas x size pods, pod i being
        # worker i % size of group i // size, on the set's shared headless Service (subdomain = its name).
        self.lws = kinds.get("LeaderWorkerSet")
        self.job, self.configmap = self.lws or kinds["Job"], kinds.get("ConfigMap")
        self.namespace = self.job["metadata"].get("namespace", "default")
        self.template = (self.lws["spec"]["leaderWorkerTemplate"]["workerTemplate"] if self.lws
                         else self.job["spec"]["template"])
        self.pod_spec = self.template["spec"]
        self.container = self.pod_spec["containers"][0]
        self.subdomain = self.job["metadata"]["name"] if self.lws else self.pod_spec.get("subdomain")
        self.tag = f"{random.randrange(16**4):04x}"
        self.bridge = f"{PREFIX}{self.tag}b"
        self.subnet = _free_subnet()

    # --- lifecycle ---

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, withhold_dns: set[int] = frozenset()) -> None:
        """Create the network, then start every pod; pods in `withhold_dns` are not yet in DNS."""
        n = (self.lws["spec"]["replicas"] * self.lws["spec"]["leaderWorkerTemplate"]["size"] if self.lws
             else self.job["spec"]["completions"])
        self._ip("link", "add", self.bridge, "type", "bridge")
        self._links.append(self.bridge)
        self._ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")
        name = self.job["metadata"]["name"]
        for i in range(n):
            root = self.workdir / f"pod-{i}"
            root.mkdir(parents=True)
            hostname = lws_hostname(self.lws, i) if self.lws else f"{name}-{i}"
            pod_name = hostname if self.lws else f"{name}-{i}-{''.join(random.choices('bcdfghjklmnpqrstvwxz2456789', k=5))}"
            pod = Pod(i, pod_name, hostname, f"{self.subnet}.{10 + i}", f"{PREFIX}{self.tag}-{i}", root)
            self._network(pod)
            self.pods.append(pod)
        self.published = set(range(n)) - set(withhold_dns)
        for pod in self.pods:
            self._write_dns(pod)
        for pod in self.pods:
            pod.proc = self._launch(pod)

    def publish(self, index: int) -> None:
        """Pod `index`'s DNS record appears (rewritten in place: the hosts files are bind mounts)."""
        self.published.add(index)
        for pod in self.pods:
            self._write_dns(pod)

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        for pod in self.pods:
            try:
                pod.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                self.kill()
                raise TimeoutError(f"pods still running after {timeout:.0f} s; logs:\n{self.logs()}") from None
        return [pod.proc.returncode for pod in self.pods]

    def logs(self) -> str:
        return "".join(f"==> {p.name} <==\n{p.log.read_text(errors='replace') if p.log.exists() else ''}"
                       for p in self.pods)

    def tcp_sockets(self) -> dict[int, set[Socket]]:
        """Per pod index, the TCP sockets of its network namespace now (what `ss -tn` would list there)."""
        out: dict[int, set[Socket]] = {}
        for pod in self.pods:
            found: set[Socket] = set()
            for table in ("tcp", "tcp6"):
                try:  # /proc/PID/net is the network namespace of PID: the pod's
                    lines = Path(f"/proc/{pod.proc.pid}/net/{table}").read_text().splitlines()[1:]
                except OSError:  # the pod has exited
                    continue
                for line in lines:
                    local, remote, state = line.split()[1:4]
                    found.add(Socket(*_address(local), *_address(remote), TCP_STATES.get(state, state)))
            out[pod.index] = found
        return out

    def kill(self) -> None:
        for pod in self.pods:
            if pod.proc is not None and pod.proc.poll() is None:
                os.killpg(pod.proc.pid, signal.SIGKILL)
                pod.proc.wait(timeout=10)

    def close(self) -> None:
        self.kill()
        for pod in self.pods:
            subprocess.run(["ip", "netns", "del", pod.netns], check=False, capture_output=True, timeout=30)
        for link in reversed(self._links):
            subprocess.run(["ip", "link", "del", link], check=False, capture_output=True, timeout=30)
        for d in reversed(self._made_dirs):
            try:
                d.rmdir()
            except OSError:
                pass

    # --- the kubelet's and the container runtime's part ---

    def _network(self, pod: Pod) -> None:
        host_end, pod_end = f"{PREFIX}{self.tag}h{pod.index}", f"{PREFIX}{self.tag}c{pod.index}"
        self._ip("netns", "add", pod.netns)
        self._ip("link", "add", host_end, "type", "veth", "peer", "name", pod_end)
        self._links.append(host_end)
        self._ip("link", "set", pod_end, "netns", pod.netns)
        self._ip("-n", pod.netns, "link", "set", pod_end, "name", "eth0")
        self._ip("-n", pod.netns, "addr", "add", f"{pod.ip}/24", "dev", "eth0")
        self._ip("-n", pod.netns, "link", "set", "eth0", "up")
        self._ip("-n", pod.netns, "link", "set", "lo", "up")
        self._ip("link", "set", host_end, "master", self.bridge, "up")

    def _write_dns(self, pod: Pod) -> None:
        # The kubelet's entry for the pod itself, then what cluster DNS would answer for published pods.
        lines = ["127.0.0.1\tlocalhost", f"{pod.ip}\t{self._fqdn(pod.hostname)}\t{pod.hostname}"]
        for other in self.pods:
            if other.index in self.published:
                names = [self._fqdn(other.hostname), f"{other.hostname}.{self.subdomain}.{self.namespace}.svc",
                         f"{other.hostname}.{self.subdomain}.{self.namespace}", f"{other.hostname}.{self.subdomain}"]
                lines.append(f"{other.ip}\t" + "\t".join(names))
        with open(pod.root / "hosts", "w") as f:  # same inode: the bind mount sees the change
            f.write("\n".join(lines) + "\n")

    def _fqdn(self, hostname: str) -> str:
        return f"{hostname}.{self.subdomain}.{self.namespace}.svc.{CLUSTER_DOMAIN}"

    def _env(self, pod: Pod) -> dict[str, str]:
        if self.lws:
            return lws_pod_env(self.lws, pod.index, pod_ip=pod.ip, path=self.path)
        return pod_env(self.job, pod.index, pod_name=pod.name, pod_ip=pod.ip, path=self.path)

    def _mounts(self, pod: Pod) -> list[tuple[str, str, str]]:
        """(kind, source, target): 'bind' and 'bind-ro' from local paths, 'tmpfs' for emptyDirs."""
        volumes = {v["name"]: v for v in self.pod_spec.get("volumes", [])}
        out = [("bind", str(pod.root / "hosts"), "/etc/hosts"), ("bind", str(pod.root / "resolv.conf"),
                                                                 "/etc/resolv.conf")]
        (pod.root / "resolv.conf").write_text(
            f"search {self.namespace}.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}\noptions ndots:5\n")
        for m in self.container.get("volumeMounts", []):
            vol, target = volumes[m["name"]], m["mountPath"]
            ro = "bind-ro" if m.get("readOnly") else "bind"
            if "configMap" in vol:
                out.append(("bind-ro", str(self._configmap_dir(pod, vol)), target))
            elif "emptyDir" in vol:
                out.append(("tmpfs", "tmpfs", target))
            elif m["name"] in self.volumes:
                self._apply_fs_group(self.volumes[m["name"]])
                out.append((ro, str(self.volumes[m["name"]]), target))
            else:
                raise ValueError(f"local pods: map volume {m['name']!r} to a local directory (volumes=...)")
        return out

    def _apply_fs_group(self, root: Path) -> None:
        """What the kubelet does to a volume for `fsGroup`: group-owned by it, group-writable, setgid dirs."""
        group = self.pod_spec.get("securityContext", {}).get("fsGroup")
        if group is None:
            return
        for path in [root, *root.rglob("*")]:
            os.chown(path, -1, group)
            mode = path.stat().st_mode
            os.chmod(path, mode | 0o060 | (0o2010 if path.is_dir() else 0))

    def _configmap_dir(self, pod: Pod, vol: dict) -> Path:
        d = pod.root / f"configmap-{vol['name']}"
        d.mkdir(exist_ok=True)
        data = self.configmap["data"]
        items = vol["configMap"].get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            (d / item["path"]).write_text(data[item["key"]])
        return d

    def _launch(self, pod: Pod) -> subprocess.Popen:
        sc = {**self.pod_spec.get("securityContext", {}), **self.container.get("securityContext", {})}
        script = ["set -e", f"hostname {pod.hostname}", *self._sysctls()]
        tmpfs = []
        for kind, source, target in self._mounts(pod):
            self._ensure_mountpoint(Path(target), is_file=Path(source).is_file())
            if kind == "tmpfs":
                tmpfs.append(target)  # last: /tmp may hold the sources of the binds
            else:
                script.append(f"mount --bind {source} {target}")
                if kind == "bind-ro":
                    script.append(f"mount -o remount,bind,ro {target}")
        if "runAsUser" in sc:
            script += self._expose_interpreter(pod)
        keep_before, keep_after = self._keep_under_tmpfs(pod, tmpfs)
        script += keep_before
        script += [f"mount -t tmpfs -o mode=1777 tmpfs {t}" for t in tmpfs]
        script += keep_after
        if sc.get("readOnlyRootFilesystem"):
            script.append("mount -o remount,bind,ro /")
        script.append(f"cd {self.container.get('workingDir', '/')}")
        setpriv = ["setpriv"]
        if "runAsUser" in sc:
            groups = ",".join(str(g) for g in [sc.get("fsGroup"), *sc.get("supplementalGroups", [])] if g is not None)
            setpriv += [f"--reuid={sc['runAsUser']}", f"--regid={sc.get('runAsGroup', sc['runAsUser'])}",
                        f"--groups={groups}" if groups else "--clear-groups"]
        if sc.get("allowPrivilegeEscalation") is False:
            setpriv.append("--no-new-privs")
        if "ALL" in sc.get("capabilities", {}).get("drop", []):
            setpriv += ["--inh-caps=-all", "--bounding-set=-all"]
        script.append(" ".join(setpriv) + ' -- "$@"')
        env = self._env(pod)
        argv = [_expand(a, env) for a in (self.command or self.container["command"]) + self.container.get("args", [])]
        with open(pod.log, "wb") as log:
            return subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{pod.netns}", "unshare", "--uts", "--mount", "--propagation",
                 "private", "--", "/bin/sh", "-c", "\n".join(script), "pod", *argv],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _sysctls(self) -> list[str]:
        """The pod's securityContext.sysctls, as the kubelet sets them: in the pod's own network namespace
        (only net.* ones are namespaced here; anything else would change the host)."""
        out = []
        for sysctl in self.pod_spec.get("securityContext", {}).get("sysctls", []):
            name, value = sysctl["name"], sysctl["value"]
            if not re.fullmatch(r"net\.[a-z0-9_.]+", name):
                raise ValueError(f"local pods set only net.* sysctls (namespaced per pod), not {name!r}")
            out.append(f"echo {shlex.quote(value)} > /proc/sys/{name.replace('.', '/')}")
        return out

    @staticmethod
    def _expose_interpreter(pod: Pod) -> list[str]:
        """The image's Python and tprun must be usable by the pod's uid. Ours may sit under a 0700
        directory (pyenv or a checkout in /root): in the pod's mount namespace, cover that directory
        with an empty 0755 tmpfs and bind only the trees the pod needs back into it. The host is
        untouched."""
        needed = {Path(os.path.realpath(sys.base_prefix)), Path(__file__).resolve().parents[1]}
        by_closed: dict[Path, list[Path]] = {}
        for tree in sorted(needed):
            closed = next((p for p in reversed(tree.parents) if p != Path("/") and not p.stat().st_mode & 0o001),
                          None)
            if closed is not None:
                by_closed.setdefault(closed, []).append(tree)
        script = []
        for n, (closed, trees) in enumerate(by_closed.items()):
            stages = [pod.root / f"expose-{n}-{i}" for i in range(len(trees))]
            for tree, stage in zip(trees, stages, strict=True):
                stage.mkdir()
                script.append(f"mount --bind {tree} {stage}")
            script.append(f"mount -t tmpfs -o mode=755 tmpfs {closed}")
            for tree, stage in zip(trees, stages, strict=True):
                script += [f"mkdir -p {tree}", f"mount --bind {stage} {tree}"]
        return script

    def _keep_under_tmpfs(self, pod: Pod, tmpfs: list[str]) -> tuple[list[str], list[str]]:
        """The image's Python and tprun stay visible when an emptyDir covers the directory they sit in
        (a checkout or venv under /tmp, as CI may have): park them outside, bind them back on top."""
        needed = {Path(os.path.realpath(sys.prefix)), Path(os.path.realpath(sys.base_prefix)),
                  Path(__file__).resolve().parents[1]}
        before: list[str] = []
        after: list[str] = []
        park = Path("/run/tprun-local-pods") / pod.hostname
        for tree in sorted(needed):
            if not any(tree.is_relative_to(t) for t in tmpfs) or any(
                    tree != o and tree.is_relative_to(o) for o in needed):
                continue
            stage = park / f"keep-{len(before)}"
            self._ensure_mountpoint(stage, is_file=False)
            before.append(f"mount --bind {tree} {stage}")
            after += [f"mkdir -p {tree}", f"mount --bind {stage} {tree}"]
        return before, after

    def _ensure_mountpoint(self, target: Path, is_file: bool) -> None:
        missing = []
        p = target if not is_file else target.parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir()
            self._made_dirs.append(d)
        if is_file and not target.exists():
            raise ValueError(f"local pods: cannot bind a file onto missing {target}")

    @staticmethod
    def _ip(*args: str) -> None:
        r = subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=30)
        if r.returncode:
            raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def pod_env(job: dict, index: int, *, pod_name: str, pod_ip: str, path: str = "/usr/bin:/bin") -> dict[str, str]:
    """The environment the container of pod `index` of an Indexed Job sees: the image's and the
    runtime's variables, JOB_COMPLETION_INDEX from the Job controller, then the manifest's env with
    downward-API fields resolved."""
    template, namespace = job["spec"]["template"], job["metadata"].get("namespace", "default")
    labels = {**template["metadata"].get("labels", {}), "batch.kubernetes.io/job-name": job["metadata"]["name"],
              "batch.kubernetes.io/job-completion-index": str(index)}
    annotations = {"batch.kubernetes.io/job-completion-index": str(index)}
    hostname = f"{job['metadata']['name']}-{index}"
    env = {"PATH": path, "HOSTNAME": hostname, "JOB_COMPLETION_INDEX": str(index)}
    return _manifest_env(template["spec"], env, labels, annotations, pod_name, namespace, pod_ip)


def lws_hostname(lws: dict, index: int) -> str:
    """LWS names the leader of group g `<lws>-<g>` and its worker w `<lws>-<g>-<w>` (pod name = hostname)."""
    group, worker = divmod(index, lws["spec"]["leaderWorkerTemplate"]["size"])
    return f"{lws['metadata']['name']}-{group}" + (f"-{worker}" if worker else "")


def lws_pod_env(lws: dict, index: int, *, pod_ip: str, path: str = "/usr/bin:/bin") -> dict[str, str]:
    """What the LWS controller (0.6+) gives pod `index`: LWS_LEADER_ADDRESS (`<leader>.<lws>.<namespace>`),
    LWS_GROUP_SIZE, LWS_WORKER_INDEX, and its name, group-index and worker-index labels; then the
    manifest's env with downward-API fields resolved."""
    name, namespace = lws["metadata"]["name"], lws["metadata"].get("namespace", "default")
    size = lws["spec"]["leaderWorkerTemplate"]["size"]
    template = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]
    group, worker = divmod(index, size)
    labels = {**template["metadata"].get("labels", {}), "leaderworkerset.sigs.k8s.io/name": name,
              "leaderworkerset.sigs.k8s.io/group-index": str(group),
              "leaderworkerset.sigs.k8s.io/worker-index": str(worker)}
    annotations = {"leaderworkerset.sigs.k8s.io/size": str(size)}
    env = {"PATH": path, "HOSTNAME": lws_hostname(lws, index), "LWS_LEADER_ADDRESS": f"{name}-{group}.{name}.{namespace}",
           "LWS_GROUP_SIZE": str(size), "LWS_WORKER_INDEX": str(worker)}
    return _manifest_env(template["spec"], env, labels, annotations, lws_hostname(lws, index), namespace, pod_ip)


def _manifest_env(pod_spec: dict, env: dict[str, str], labels: dict, annotations: dict, pod_name: str,
                  namespace: str, pod_ip: str) -> dict[str, str]:
    fields = {"metadata.name": pod_name, "metadata.namespace": namespace, "status.podIP": pod_ip,
              "spec.nodeName": "local", "spec.serviceAccountName": pod_spec.get("serviceAccountName", "default")}
    for var in pod_spec["containers"][0].get("env", []):
        if "value" in var:
            env[var["name"]] = _expand(var["value"], env)
            continue
        ref = var["valueFrom"]["fieldRef"]["fieldPath"]
        m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", ref)
        if m:
            env[var["name"]] = (labels if m[1] == "labels" else annotations)[m[2]]
        elif ref in fields:
            env[var["name"]] = fields[ref]
        else:
            raise ValueError(f"local pods cannot resolve fieldRef {ref!r} of env {var['name']}")
    return env


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables are replaced, others left as written."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), text)


@dataclass(frozen=True)
class Socket:
    local_ip: str
    local_port: int
    remote_ip: str
    remote_port: int
    state: str


TCP_STATES = {"01": "ESTABLISHED", "0A": "LISTEN"}


def _address(text: str) -> tuple[str, int]:
    """/proc/net/tcp's 'HEXIP:HEXPORT' (the IP in host byte order, little-endian here); IPv4-mapped IPv6
    addresses come back as IPv4."""
    ip_hex, port_hex = text.split(":")
    raw = bytes.fromhex(ip_hex)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip), int(port_hex, 16)


def _free_subnet() -> str:
    used = subprocess.run(["ip", "-4", "-o", "addr"], check=True, capture_output=True, text=True,
                          timeout=30).stdout
    for _ in range(100):
        subnet = f"10.78.{random.randrange(1, 255)}"
        if f" {subnet}." not in used:
            return subnet
    raise RuntimeError("no free 10.78.x.0/24 subnet for the local pods")
