"""A Ray multi-node test cluster on this host, for tests/test_cluster.py: N raylets, every
one bound to 127.0.0.1 so that all of Ray's traffic stays on loopback.

Run as a child process: it prints the cluster's address, then reads commands from stdin
("remove" takes away the newest worker node, as a lost host; "quit" shuts the cluster down).
It dies with its parent (Ray's reaper takes the raylets with it).
"""

import os
import sys

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read at import: Ray keeps loopback addresses

from ray.cluster_utils import Cluster  # noqa: E402

NODE = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}


def main() -> None:
    from smpd.host.proc import die_with_parent

    die_with_parent()
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
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


if __name__ == "__main__":
    main()
