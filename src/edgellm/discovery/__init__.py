"""Pod discovery: where the engines that publish KV events are.

- :class:`Pod` (``edgellm.discovery.pod``): one engine, with AIBrix's qualification rule;
- :class:`PodProvider` / :class:`PodListener` and the in-memory :class:`StaticPodProvider`
  (``edgellm.discovery.provider``), to which pods are added and removed programmatically;
- providers built on it: ``static_file.FilePodProvider`` (JSON/YAML file, re-read on
  change), ``unit_registry.UnitRegistryPodProvider`` (units announced to the unit manager),
  ``k8s.KubernetesPodProvider`` (list + watch with the official client).
"""

from edgellm.discovery.pod import Pod, pod_from_labels
from edgellm.discovery.provider import PodListener, PodProvider, StaticPodProvider

__all__ = ["Pod", "PodListener", "PodProvider", "StaticPodProvider", "pod_from_labels"]
