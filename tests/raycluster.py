"""A Ray multi-node test cluster on this host, for tests/test_cluster.py: N raylets, every
one bound to 127.0.0.1 so that all of Ray's traffic stays on loopback.

Run as a child process: it prints the cluster's address, then reads commands from stdin
("remove" takes away the newest worker node, as a lost host; "quit" shuts the cluster down).
It dies with its parent (Ray's reaper takes the raylets with it).
"""

import os
import shutil
import sys
import tempfile

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read at import: Ray keeps loopback addresses
# Ray's files (sessions, sockets, and the "latest cluster" record that `ray.init("auto")` reads)
# under a directory of this cluster's own: a user's `ray start` on this host is left alone.
TMP = tempfile.mkdtemp(prefix="smpd-ray-")
os.environ["RAY_TMPDIR"] = TMP

from ray.cluster_utils import Cluster  # noqa: E402

NODE = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}


def main() -> None:
    from smpd.host.proc import die_with_parent

    die_with_parent()
    # A lost node is noticed after 2 missed health checks 0.5 s apart, not Ray's default ~30 s.
    cluster = Cluster(initialize_head=True, head_node_args={
        **NODE, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 2}})
    workers = [cluster.add_node(**NODE) for _ in range(int(sys.argv[1]) - 1)]
    cluster.wait_for_nodes()
    print(cluster.address, flush=True)
    for line in sys.stdin:
        if line.strip() == "remove" and workers:
            node = workers.pop()
            cluster.remove_node(node, allow_graceful=False)
            print(f"removed {node.unique_id}", flush=True)
        elif line.strip() == "quit":
            break
    cluster.shutdown()
    shutil.rmtree(TMP, ignore_errors=True)


if __name__ == "__main__":
    main()
