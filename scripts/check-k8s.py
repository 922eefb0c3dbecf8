#!/usr/bin/env python3
"""Static checks of the Kubernetes manifests in deploy/k8s (run by `make test`).

No cluster is needed. Three parts:

1. Schema: every resource is validated, rejecting unknown fields, against the Kubernetes API
   schemas bundled in the kubernetes-validate package (no network at check time), for the oldest
   Kubernetes the manifests support and for the newest the package knows.
2. What a schema cannot know: the settings named in the ConfigMap and Secret are real adbeacon
   settings (the README's configuration table, which a test keeps equal to src/config.rs), the
   probes hit /healthz and /readyz on the served port, the pod runs non-root on a read-only root
   filesystem with a writable volume at DATA_DIR, the memory limit covers a full buffer with its
   client event ids (memory_needed), the termination grace period covers preStop,
   in-flight requests and SHUTDOWN_TIMEOUT, labels and selectors agree across workload, Services,
   PodDisruptionBudget and HPA, and kustomization.yaml lists every manifest. REDIS_URL is set
   (the default, 127.0.0.1, has no Redis in a pod), in the ConfigMap only without a password.
3. Redis for the spill, when kustomization.yaml lists the redis/ directory: its manifests
   validate as above; one replica, with appendonly yes, maxmemory-policy noeviction and a
   maxmemory at most 3/4 of its memory limit, its data on a volumeClaimTemplate, non-root with
   no privileges (the namespace enforces the restricted Pod Security Standard); REDIS_URL names
   its Service and port; a NetworkPolicy, if any, lets adbeacon's server pods in.

    scripts/check-k8s.py [DIR]      (default: deploy/k8s)

Exits 1 naming every problem found, 2 when it cannot run.
"""

import re
import sys
from pathlib import Path
from urllib.parse import urlsplit

try:
    import yaml
    import kubernetes_validate
    from kubernetes_validate import utils as kv_utils
except ImportError as e:  # pragma: no cover
    sys.exit(f"check-k8s: {e}; run `bash scripts/deps.sh test` (it installs PyYAML and kubernetes-validate)")

ROOT = Path(__file__).resolve().parent.parent

# The oldest Kubernetes the manifests are written for (the preStop sleep action is on by default
# from 1.30); the newest is whatever the pinned kubernetes-validate bundles.
MIN_KUBERNETES = "1.30"

EXPECTED_API = {
    "Namespace": "v1",
    "ConfigMap": "v1",
    "Secret": "v1",
    "Service": "v1",
    "StatefulSet": "apps/v1",
    "Deployment": "apps/v1",
    "Job": "batch/v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "PodDisruptionBudget": "policy/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
}

# Files kustomization.yaml must leave out, and why; every other manifest must be listed.
NOT_IN_KUSTOMIZATION = {
    "secret.example.yaml": "a template with placeholders; `apply -k` would overwrite the real Secret",
    "migrate-job.yaml": "a one-off Job created per upgrade",
}

PLACEHOLDER = "CHANGE-ME"

errors = []


def fail(where, message):
    errors.append(f"{where}: {message}")


# Bytes a remembered client event id takes: a 40-byte slot and its place in the index (10.7 to
# 21.3 bytes; twice that while the index doubles), with room (docs/PERFORMANCE.md, "The id
# store's slab" and "The id index and reads issued ahead").
ID_BYTES = 80
# Bytes of an event in the buffer, as BUFFER_MAX_BYTES counts it (EventRow::SIZE).
EVENT_BYTES = 104


def memory_needed(buffer, ids_max, ack_mode):
    """The memory limit an adbeacon pod needs with its buffer full: at least twice the buffer,
    and at least the sum of what was measured (deploy/k8s/README.md, "Memory"): the process (41
    MiB idle, about 70 MiB under load with its caches and connections; 96 MiB here, with room);
    the buffer as its chunks hold it (a full 256 MiB buffer took 307 MiB); and the EVENT_IDS_MAX
    ids remembered outside it. In `committed` mode every request answered 503 during an outage
    keeps its ids a turn more after the store, outside the buffer too: up to EVENT_IDS_MAX of
    them, or as many as the buffer holds events."""
    need = 96 * 2**20 + buffer * 5 // 4 + ids_max * ID_BYTES
    if ack_mode == "committed":
        need += max(ids_max, buffer // EVENT_BYTES) * ID_BYTES
    return max(2 * buffer, need)


def readme_settings():
    """Names, defaults and the secret ones, from README.md's configuration table."""
    text = (ROOT / "README.md").read_text()
    settings = {}
    for line in text.splitlines():
        m = re.match(r"^\| `([A-Z][A-Z0-9_]*)` \| ([^|]*) \|", line)
        if m:
            default = m.group(2).strip()
            settings[m.group(1)] = "" if default == "(empty)" else default.strip("`")
    if len(settings) < 10:
        sys.exit("check-k8s: cannot find the configuration table in README.md")
    m = re.search(r"Secrets \(([^)]*)\) are never", text)
    if not m:
        sys.exit("check-k8s: README.md no longer names the secret settings (\"Secrets (...) are never\")")
    secret = set(re.findall(r"`([A-Z_]+)`", m.group(1)))
    return settings, secret


def redacted_settings():
    """Settings src/config.rs never echoes (`secret: true`): they may live in the Secret. The
    README's list (readme_settings) is the ones that must."""
    text = (ROOT / "src" / "config.rs").read_text()
    return set(re.findall(r'name:\s*"([A-Z][A-Z0-9_]*)",[^}]*?secret:\s*true', text))


def redis_bytes(text):
    """A Redis memory size (1gb, 512mb, 100000000), in bytes: k/m/g are powers of 1000, kb/mb/gb
    of 1024, as redis.conf reads them."""
    m = re.fullmatch(r"(\d+)\s*([kmg]b?)?", str(text).strip().lower())
    if not m:
        raise ValueError(f"not a Redis memory size: {text!r}")
    unit = m.group(2) or ""
    mult = {"": 1, "k": 10**3, "kb": 2**10, "m": 10**6, "mb": 2**20, "g": 10**9, "gb": 2**30}[unit]
    return int(m.group(1)) * mult


def request_grace_seconds():
    """How long in-flight requests may take once shutdown begins (src/app.rs)."""
    text = (ROOT / "src" / "app.rs").read_text()
    m = re.search(r"const REQUEST_GRACE: Duration = Duration::from_secs\((\d+)\);", text)
    if not m:
        sys.exit("check-k8s: cannot find REQUEST_GRACE in src/app.rs")
    return int(m.group(1))


def duration_seconds(text):
    """A humantime duration such as 30s, 1m30s, 500ms, in seconds."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+)\s*([a-z]+)", text)
    if not parts or re.sub(r"[\d\sa-z]", "", text) or any(u not in units for _, u in parts):
        raise ValueError(f"not a duration: {text!r}")
    return sum(int(n) * units[u] for n, u in parts)


def size_bytes(text):
    """An adbeacon size (64KiB, 16MiB) or a Kubernetes quantity (512Mi, 1Gi, 500M), in bytes."""
    m = re.fullmatch(r"(\d+)\s*([A-Za-z]*)", str(text).strip())
    if not m:
        raise ValueError(f"not a size: {text!r}")
    mult = {
        "": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
        "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30,
    }.get(m.group(2).lower())
    if mult is None:
        raise ValueError(f"unknown unit in {text!r}")
    return int(m.group(1)) * mult


def cpu_millis(text):
    text = str(text)
    return int(text[:-1]) if text.endswith("m") else int(float(text) * 1000)


def labels_match(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def load(directory):
    """Every document of every *.yaml file: {file: [documents]}."""
    docs = {}
    for path in sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml")):
        try:
            loaded = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except yaml.YAMLError as e:  # still counted as a file, so the kustomization check holds
            fail(path.name, f"does not parse as YAML: {e}")
            loaded = None
        if loaded == []:
            fail(path.name, "holds no document")
        docs[path.name] = loaded or []
    return docs


def check_schemas(docs):
    versions = [MIN_KUBERNETES, kv_utils.major_minor(kv_utils.latest_version())]
    for name, documents in docs.items():
        for doc in documents:
            if not isinstance(doc, dict):
                fail(name, "a document is not a mapping")
                continue
            kind, api = doc.get("kind"), doc.get("apiVersion")
            if kind not in EXPECTED_API:
                fail(name, f"unexpected kind {kind!r} (expected one of {', '.join(EXPECTED_API)})")
                continue
            if api != EXPECTED_API[kind]:
                fail(name, f"{kind} has apiVersion {api!r}; use the stable {EXPECTED_API[kind]!r}")
                continue
            if kind == "Kustomization":
                continue
            for version in versions:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    path = ".".join(str(p) for p in e.path)
                    fail(name, f"{kind} does not validate against Kubernetes {version}: {path}: {e.message}")
                except Exception as e:  # SchemaNotFoundError and the like carry .message
                    fail(name, f"{kind}: {getattr(e, 'message', e)}")
    return versions


def check_security(where, pod, container):
    pod_sc = pod.get("securityContext") or {}
    sc = container.get("securityContext") or {}

    def either(field):
        return sc.get(field, pod_sc.get(field))

    if either("runAsNonRoot") is not True:
        fail(where, "securityContext.runAsNonRoot must be true")
    if either("runAsUser") != 10001:
        fail(where, f"securityContext.runAsUser must be 10001, is {either('runAsUser')!r}")
    if sc.get("readOnlyRootFilesystem") is not True:
        fail(where, "securityContext.readOnlyRootFilesystem must be true")
    if sc.get("allowPrivilegeEscalation") is not False:
        fail(where, "securityContext.allowPrivilegeEscalation must be false")
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
        fail(where, "securityContext.capabilities.drop must include ALL")
    if (either("seccompProfile") or {}).get("type") != "RuntimeDefault":
        fail(where, "securityContext.seccompProfile.type must be RuntimeDefault")
    if (sc.get("capabilities") or {}).get("add"):
        fail(where, "securityContext.capabilities.add must be empty")
    if sc.get("privileged") or pod.get("hostNetwork") or pod.get("hostPID"):
        fail(where, "no privileged mode, host network or host PID")


def check_env_names(where, container, settings):
    for env in container.get("env") or []:
        if env.get("name") not in settings:
            fail(where, f"env {env.get('name')!r} is not an adbeacon setting (README.md, Configuration)")


def prestop_seconds(where, container):
    pre = ((container.get("lifecycle") or {}).get("preStop")) or {}
    if "sleep" in pre:
        return int(pre["sleep"].get("seconds", 0))
    command = (pre.get("exec") or {}).get("command") or []
    m = re.search(r"\bsleep\s+(\d+)\b", " ".join(map(str, command)))
    if m:
        return int(m.group(1))
    fail(where, "lifecycle.preStop must sleep (sleep: {seconds: N}, or exec sleep N) so that the "
                "pod leaves the Service's endpoints before SIGTERM")
    return 0


def check_redis(rdir, redis_url, cfile, server_labels, namespace):
    """The redis/ kustomization: see the module's docstring, part 3."""
    rel = rdir.name
    docs = {f"{rel}/{name}": d for name, d in load(rdir).items()}
    check_schemas(docs)
    by_kind = {}
    for name, documents in docs.items():
        for doc in documents:
            if isinstance(doc, dict):
                by_kind.setdefault(doc.get("kind"), []).append((name, doc))
    kusts = by_kind.get("Kustomization", [])
    if len(kusts) != 1:
        fail(rel, f"expected one kustomization.yaml, found {len(kusts)}")
    for kfile, kust in kusts:
        listed = [f"{rel}/{r}" for r in kust.get("resources") or []]
        for name in docs:
            if name != kfile and name not in listed:
                fail(kfile, f"does not list {name.split('/', 1)[1]}")
        if kust.get("namespace"):
            fail(kfile, "sets a namespace; the parent kustomization.yaml sets adbeacon's")

    sets = by_kind.get("StatefulSet", [])
    if len(sets) != 1:
        fail(rel, f"expected one StatefulSet (Redis), found {len(sets)}")
        return 0
    rfile, sts = sets[0]
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    labels = (spec["template"].get("metadata") or {}).get("labels") or {}
    if not labels_match((spec.get("selector") or {}).get("matchLabels") or {}, labels):
        fail(rfile, "the selector does not match the pod labels")
    if labels_match(server_labels, labels):
        fail(rfile, f"the Redis pods carry adbeacon's server labels {server_labels}: its Services would send them traffic")
    if spec.get("replicas", 1) != 1:
        fail(rfile, "replicas must be 1: each replica would be a separate Redis with a spill of its own")
    c = next((c for c in pod.get("containers") or [] if c.get("name") == "redis"), None)
    if c is None:
        fail(rfile, "has no container named redis")
        return 0
    where = f"{rfile} container redis"
    image = c.get("image", "")
    if ":" not in image or image.rsplit(":", 1)[1] == "latest":
        fail(where, f"image {image!r} is not pinned")

    argv = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
    opts = {}
    for i, a in enumerate(argv):
        if a.startswith("--"):
            opts[a[2:]] = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else ""
    if opts.get("appendonly") != "yes":
        fail(where, "needs --appendonly yes: without it a restart of Redis loses the spill")
    if opts.get("maxmemory-policy") != "noeviction":
        fail(where, "needs --maxmemory-policy noeviction: any other policy may evict spilled batches, "
                    "and adbeacon refuses to spill into it (/readyz 503)")
    limit = ((c.get("resources") or {}).get("limits") or {}).get("memory")
    if "maxmemory" not in opts:
        fail(where, "needs --maxmemory below its memory limit: without it a full spill gets Redis OOM-killed")
    elif not limit:
        fail(where, "resources.limits.memory is not set")
    else:
        try:
            if redis_bytes(opts["maxmemory"]) * 4 > size_bytes(limit) * 3:
                fail(where, f"--maxmemory {opts['maxmemory']} is over 3/4 of the memory limit {limit}: "
                            "an AOF rewrite forks, and its copy-on-write pages need the rest")
        except ValueError as e:
            fail(where, str(e))
    data_dir = opts.get("dir", "/data")
    claims = [t["metadata"]["name"] for t in spec.get("volumeClaimTemplates") or []]
    mount = next((m for m in c.get("volumeMounts") or [] if m.get("mountPath") == data_dir), None)
    if mount is None or mount.get("name") not in claims:
        fail(where, f"its data directory {data_dir} must be a volumeClaimTemplate's mount: the "
                    "append-only file has to outlive the pod")
    if not c.get("readinessProbe"):
        fail(where, "no readinessProbe: the Service would route to a Redis still loading its file")

    pod_sc, sc = pod.get("securityContext") or {}, c.get("securityContext") or {}

    def either(field):
        return sc.get(field, pod_sc.get(field))
    if either("runAsNonRoot") is not True or either("runAsUser") in (None, 0):
        fail(where, "must run as a non-root user (runAsNonRoot and a runAsUser)")
    if sc.get("readOnlyRootFilesystem") is not True:
        fail(where, "securityContext.readOnlyRootFilesystem must be true")
    if sc.get("allowPrivilegeEscalation") is not False:
        fail(where, "securityContext.allowPrivilegeEscalation must be false")
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
        fail(where, "securityContext.capabilities.drop must include ALL")
    if (either("seccompProfile") or {}).get("type") != "RuntimeDefault":
        fail(where, "securityContext.seccompProfile.type must be RuntimeDefault")
    if pod.get("automountServiceAccountToken") is not False:
        fail(rfile, "automountServiceAccountToken should be false (Redis never calls the API)")

    ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
    services = [(n, s) for n, s in by_kind.get("Service", [])
                if labels_match(s["spec"].get("selector") or {}, labels)]
    if not services:
        fail(rel, "no Service selects the Redis pod")
    count = sum(len(d) for d in docs.values())
    url = urlsplit(redis_url or "")
    if not redis_url:
        return count  # unset (reported by the caller) or no spill: nothing has to reach this Redis
    host, port = url.hostname or "", url.port or 6379
    names = {s["metadata"]["name"]: s for _, s in services}
    svc = names.get(host.split(".")[0])
    if url.scheme != "redis" or svc is None or (
        "." in host
        and not re.fullmatch(rf"{re.escape(host.split('.')[0])}\.{re.escape(namespace or '')}(\.svc(\.[a-z0-9.-]+)?)?", host)
    ):
        fail(cfile, f"REDIS_URL {redis_url!r} does not name the Service of {rel}/ ({', '.join(names) or 'none'}) "
                    f"in namespace {namespace}")
    elif not any(p.get("port") == port and p.get("targetPort") in (ports.get("redis"), "redis", *ports.values())
                 for p in svc["spec"].get("ports") or []):
        fail(cfile, f"REDIS_URL port {port} is not a port of Service {svc['metadata']['name']} leading to Redis")
    for nfile, policy in by_kind.get("NetworkPolicy", []):
        pspec = policy["spec"]
        if not labels_match((pspec.get("podSelector") or {}).get("matchLabels") or {}, labels):
            continue
        admitted = any(labels_match((peer.get("podSelector") or {}).get("matchLabels") or {}, server_labels)
                       and not peer.get("namespaceSelector")
                       for rule in pspec.get("ingress") or [] for peer in rule.get("from") or [])
        if not admitted:
            fail(nfile, f"NetworkPolicy {policy['metadata']['name']} shuts adbeacon's server pods out of Redis")
    return count


def main():
    directory = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "deploy" / "k8s"
    if not directory.is_dir():
        sys.exit(f"check-k8s: {directory} is not a directory")
    settings, secret_settings = readme_settings()
    grace = request_grace_seconds()

    docs = load(directory)
    versions = check_schemas(docs)

    by_kind = {}
    for name, documents in docs.items():
        for doc in documents:
            if isinstance(doc, dict):
                by_kind.setdefault(doc.get("kind"), []).append((name, doc))

    def only(kind):
        found = by_kind.get(kind, [])
        if len(found) != 1:
            fail(str(directory), f"expected exactly one {kind}, found {len(found)}")
            return None, {}
        return found[0]

    # --- kustomization lists every manifest but the deliberate exceptions
    kfile, kust = only("Kustomization")
    namespace = None
    if kust:
        listed = kust.get("resources") or []
        for entry in listed:
            if entry not in docs and not (directory / entry / "kustomization.yaml").is_file():
                fail(kfile, f"lists {entry}, which is neither a manifest nor a kustomization in {directory}")
            if entry in NOT_IN_KUSTOMIZATION:
                fail(kfile, f"must not list {entry}: {NOT_IN_KUSTOMIZATION[entry]}")
        for name in docs:
            if name not in listed and name != kfile and name not in NOT_IN_KUSTOMIZATION:
                fail(kfile, f"does not list {name}")
        namespace = kust.get("namespace")
        if not namespace:
            fail(kfile, "sets no namespace")
        namespaces = [d["metadata"]["name"] for _, d in by_kind.get("Namespace", [])]
        if namespaces and namespace not in namespaces:
            fail(kfile, f"namespace {namespace!r} is not the one namespace.yaml creates ({namespaces})")
        for name in NOT_IN_KUSTOMIZATION:
            for doc in docs.get(name, []):
                if isinstance(doc, dict) and (doc.get("metadata") or {}).get("namespace") != namespace:
                    fail(name, f"applied on its own, so it must set metadata.namespace: {namespace}")
    for name in NOT_IN_KUSTOMIZATION:
        if name not in docs:
            fail(str(directory), f"{name} is missing")

    # --- ConfigMap and Secret: real settings only, secrets in the Secret, placeholders only
    cfile, configmap = only("ConfigMap")
    cfile = cfile or "the ConfigMap"
    config = {}
    if configmap:
        config = configmap.get("data") or {}
        for key in config:
            if key not in settings:
                fail(cfile, f"{key} is not an adbeacon setting (README.md, Configuration)")
            elif key in secret_settings:
                fail(cfile, f"{key} is a secret; it belongs in the Secret")
        if urlsplit(str(config.get("REDIS_URL", ""))).password:
            fail(cfile, "REDIS_URL carries a password; it belongs in the Secret")
    may_be_secret = secret_settings | redacted_settings()
    sfile, secret = only("Secret")
    values = {}
    if secret:
        values = {**(secret.get("stringData") or {}), **(secret.get("data") or {})}
        for key, value in values.items():
            if key not in settings:
                fail(sfile, f"{key} is not an adbeacon setting (README.md, Configuration)")
            elif key not in may_be_secret:
                fail(sfile, f"{key} is not a secret setting; it belongs in the ConfigMap")
            if PLACEHOLDER not in str(value):
                fail(sfile, f"{key} must hold a {PLACEHOLDER} placeholder, never a real value")
        if "IP_HASH_KEY" not in values:
            fail(sfile, "must set IP_HASH_KEY: replicas need one shared key for unique counts to add up")
        if sfile not in NOT_IN_KUSTOMIZATION:
            fail(sfile, "the Secret must be a template kept out of kustomization.yaml")

    def setting(name):
        return config.get(name, settings.get(name, ""))

    if "REDIS_URL" not in config and "REDIS_URL" not in values:
        fail(cfile, f"REDIS_URL is not set: its default ({settings.get('REDIS_URL')}) has no Redis in "
                    "a pod; name the spill's Redis, or set it empty for no spill")

    # --- the workload
    workloads = by_kind.get("StatefulSet", []) + by_kind.get("Deployment", [])
    if len(workloads) != 1:
        fail(str(directory), f"expected one StatefulSet or Deployment, found {len(workloads)}")
        workloads = [(None, None)]
    wfile, work = workloads[0]
    selector, pod_labels, port, image = {}, {}, None, None
    if work:
        spec = work["spec"]
        selector = (spec.get("selector") or {}).get("matchLabels") or {}
        template = spec["template"]
        pod_labels = (template.get("metadata") or {}).get("labels") or {}
        pod = template["spec"]
        if not labels_match(selector, pod_labels):
            fail(wfile, f"selector {selector} does not match the pod labels {pod_labels}")
        containers = pod.get("containers") or []
        main_c = next((c for c in containers if c.get("name") == "adbeacon"), None)
        if main_c is None:
            fail(wfile, "has no container named adbeacon")
            main_c = {}
        where = f"{wfile} container adbeacon"
        image = main_c.get("image")
        if main_c.get("args", ["serve"])[:1] != ["serve"]:
            fail(where, f"args must run `serve`, are {main_c.get('args')}")
        refs = main_c.get("envFrom") or []
        cm_refs = [r["configMapRef"]["name"] for r in refs if "configMapRef" in r]
        sec_refs = [r["secretRef"]["name"] for r in refs if "secretRef" in r]
        if configmap and cm_refs != [configmap["metadata"]["name"]]:
            fail(where, f"envFrom must name the ConfigMap {configmap['metadata']['name']!r}, names {cm_refs}")
        if secret and sec_refs != [secret["metadata"]["name"]]:
            fail(where, f"envFrom must name the Secret {secret['metadata']['name']!r}, names {sec_refs}")
        check_env_names(where, main_c, settings)

        # port and probes
        try:
            port = int(setting("PORT"))
        except ValueError:
            fail(cfile, f"PORT is not a number: {setting('PORT')!r}")
        named = {p.get("name"): p.get("containerPort") for p in main_c.get("ports") or []}
        if named.get("http") != port:
            fail(where, f"needs a port named http with containerPort {port} (PORT), has {named}")
        for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = ((main_c.get(probe) or {}).get("httpGet")) or {}
            if get.get("path") != path:
                fail(where, f"{probe} must GET {path}, gets {get.get('path')!r}")
            if get.get("port") not in ("http", port):
                fail(where, f"{probe} must use port http ({port}), uses {get.get('port')!r}")

        # resources
        res = main_c.get("resources") or {}
        requests, limits = res.get("requests") or {}, res.get("limits") or {}
        for key in ("cpu", "memory"):
            if key not in requests:
                fail(where, f"resources.requests.{key} is not set (the HPA and the scheduler need it)")
        if "memory" not in limits:
            fail(where, "resources.limits.memory is not set")
        else:
            try:
                buffer = size_bytes(setting("BUFFER_MAX_BYTES"))
                limit = size_bytes(limits["memory"])
                need = memory_needed(buffer, int(setting("EVENT_IDS_MAX")), setting("ACK_MODE"))
                if limit < need:
                    fail(where, f"memory limit {limits['memory']} is under {need / 2**20:.0f} MiB, what a full "
                                f"buffer needs (BUFFER_MAX_BYTES {setting('BUFFER_MAX_BYTES')}, EVENT_IDS_MAX "
                                f"{setting('EVENT_IDS_MAX')}, ACK_MODE {setting('ACK_MODE')}; see memory_needed): "
                                "the pod would be OOM-killed")
                if "memory" in requests and size_bytes(requests["memory"]) > limit:
                    fail(where, "memory request is above its limit")
            except ValueError as e:
                fail(where, str(e))
        if "cpu" in requests and "cpu" in limits and cpu_millis(requests["cpu"]) > cpu_millis(limits["cpu"]):
            fail(where, "cpu request is above its limit")

        check_security(where, pod, main_c)
        if pod.get("automountServiceAccountToken") is not False:
            fail(wfile, "automountServiceAccountToken should be false (the service never calls the API)")

        # DATA_DIR: a writable volume where the root filesystem is read-only
        data_dir = setting("DATA_DIR")
        if not data_dir.startswith("/"):
            fail(cfile, f"DATA_DIR must be an absolute path on the mounted volume, is {data_dir!r}")
        mount = next((m for m in main_c.get("volumeMounts") or [] if m.get("mountPath") == data_dir), None)
        if mount is None:
            fail(where, f"no volume is mounted at DATA_DIR ({data_dir}); with a read-only root "
                        "filesystem the service could not save dead letters")
        else:
            if mount.get("readOnly"):
                fail(where, f"the volume at DATA_DIR ({data_dir}) is mounted read-only")
            claims = [t["metadata"]["name"] for t in spec.get("volumeClaimTemplates") or []]
            volumes = {v["name"]: v for v in pod.get("volumes") or []}
            if mount["name"] not in claims and mount["name"] not in volumes:
                fail(where, f"mounts {mount['name']!r}, which is neither a volume nor a volumeClaimTemplate")
            if work["kind"] == "Deployment" and "emptyDir" in volumes.get(mount["name"], {}):
                # allowed, but a comment must say what is lost with the pod
                comments = [l for l in (directory / wfile).read_text().splitlines() if l.strip().startswith("#")]
                if not any("emptyDir" in l for l in comments):
                    fail(wfile, "an emptyDir at DATA_DIR loses dead letters with the pod; say so in a comment")

        # shutdown: preStop, then in-flight requests, then the flush
        pre = prestop_seconds(where, main_c)
        try:
            shutdown = duration_seconds(setting("SHUTDOWN_TIMEOUT"))
        except ValueError as e:
            fail(cfile, str(e))
            shutdown = 0
        needed = pre + grace + shutdown + 5
        tgps = pod.get("terminationGracePeriodSeconds", 30)
        if tgps < needed:
            fail(wfile, f"terminationGracePeriodSeconds {tgps} must be at least {needed}: preStop {pre} s "
                        f"+ REQUEST_GRACE {grace} s (src/app.rs) + SHUTDOWN_TIMEOUT {shutdown:g} s + 5 s "
                        "to write dead letters; the SIGKILL after it loses the buffer")

        spread = pod.get("topologySpreadConstraints") or []
        if not spread:
            fail(wfile, "no topologySpreadConstraints: replicas could all land on one node")
        for c in spread:
            if not labels_match((c.get("labelSelector") or {}).get("matchLabels") or {}, pod_labels):
                fail(wfile, f"topology spread on {c.get('topologyKey')} selects other pods than these")

        if work["kind"] == "StatefulSet":
            headless = [d for _, d in by_kind.get("Service", []) if d["metadata"]["name"] == spec.get("serviceName")]
            if not headless or headless[0]["spec"].get("clusterIP") != "None":
                fail(wfile, f"serviceName {spec.get('serviceName')!r} must name a headless Service in service.yaml")

    # --- Services, PDB and HPA select and target this workload, and nothing else
    job_labels = []
    for _, job in by_kind.get("Job", []):
        job_labels.append(((job["spec"]["template"].get("metadata") or {}).get("labels")) or {})
    services = by_kind.get("Service", [])
    if not any(d["spec"].get("clusterIP") != "None" for _, d in services):
        fail(str(directory), "no (non-headless) Service in front of the pods")
    for sfile_, svc in services:
        where = f"{sfile_} Service {svc['metadata']['name']}"
        sel = svc["spec"].get("selector") or {}
        if sel != selector:
            fail(where, f"selector {sel} differs from the workload's {selector}")
        for labels in job_labels:
            if labels_match(sel, labels):
                fail(where, f"selector {sel} also picks the migrate Job's pods")
        for p in svc["spec"].get("ports") or []:
            if p.get("targetPort") not in ("http", port):
                fail(where, f"targetPort {p.get('targetPort')!r} is not the pods' http port ({port})")

    pfile, pdb = only("PodDisruptionBudget")
    hfile, hpa = only("HorizontalPodAutoscaler")
    if pdb:
        sel = (pdb["spec"].get("selector") or {}).get("matchLabels") or {}
        if sel != selector:
            fail(pfile, f"selector {sel} differs from the workload's {selector}")
        spec = pdb["spec"]
        if "maxUnavailable" not in spec and "minAvailable" not in spec:
            fail(pfile, "sets neither maxUnavailable nor minAvailable")
        min_replicas = (hpa or {}).get("spec", {}).get("minReplicas", 1)
        if isinstance(spec.get("minAvailable"), int) and spec["minAvailable"] >= min_replicas:
            fail(pfile, f"minAvailable {spec['minAvailable']} >= minReplicas {min_replicas}: no node could ever be drained")
    if hpa and work:
        target = hpa["spec"]["scaleTargetRef"]
        if (target.get("apiVersion"), target.get("kind"), target.get("name")) != (
            work["apiVersion"], work["kind"], work["metadata"]["name"]
        ):
            fail(hfile, f"scaleTargetRef {target} is not the workload {work['kind']}/{work['metadata']['name']}")
        if "replicas" in work["spec"]:
            fail(wfile, "sets spec.replicas, which every `kubectl apply` would put back over the HPA's count")
        if hpa["spec"].get("minReplicas", 1) < 2:
            fail(hfile, "minReplicas must be 2 or more: one pod being replaced must not take the service down")
        if not any((m.get("resource") or {}).get("name") == "cpu" for m in hpa["spec"].get("metrics") or []):
            fail(hfile, "scales on no CPU metric")

    # --- the migrate Job
    jobs = by_kind.get("Job", [])
    if len(jobs) != 1:
        fail(str(directory), f"expected one Job (adbeacon migrate), found {len(jobs)}")
    for jfile, job in jobs:
        pod = job["spec"]["template"]["spec"]
        containers = pod.get("containers") or []
        for c in containers:
            where = f"{jfile} container {c.get('name')}"
            if c.get("args") != ["migrate"]:
                fail(where, f"must run `adbeacon migrate` (args: [migrate]), runs {c.get('args')}")
            if image and c.get("image") != image:
                fail(where, f"image {c.get('image')!r} differs from the workload's {image!r}")
            names = [r.get("configMapRef", r.get("secretRef", {})).get("name") for r in c.get("envFrom") or []]
            if configmap and secret and sorted(names) != sorted([configmap["metadata"]["name"], secret["metadata"]["name"]]):
                fail(where, f"envFrom must name the same ConfigMap and Secret as the server, names {names}")
            check_env_names(where, c, settings)
            check_security(where, pod, c)
        if pod.get("restartPolicy") not in ("Never", "OnFailure"):
            fail(jfile, "restartPolicy must be Never or OnFailure")

    # --- Redis for the spill, when the kustomization includes it
    redis_resources = None
    if kust and "redis" in (kust.get("resources") or []):
        # Where it is set: the ConfigMap, or the Secret template (its host is real, the password
        # a placeholder). Unset was reported above.
        redis_url = config.get("REDIS_URL", values.get("REDIS_URL"))
        redis_resources = check_redis(directory / "redis", redis_url, cfile, pod_labels, namespace)

    if errors:
        print("check-k8s: FAILED", file=sys.stderr)
        for e in errors:
            print(f"  {e}", file=sys.stderr)
        print(f"check-k8s: {len(errors)} problem(s) in {directory}", file=sys.stderr)
        return 1
    count = sum(len(d) for d in docs.values())
    redis_note = f", Redis in redis/ ({redis_resources} resources)" if redis_resources is not None else ""
    print(f"check-k8s: {len(docs)} files, {count} resources{redis_note} in {directory.relative_to(ROOT) if directory.is_relative_to(ROOT) else directory} "
          f"pass (schemas of Kubernetes {' and '.join(versions)}, strict; settings from README.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
