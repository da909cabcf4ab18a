"""GPU kernels applied from outside the network, each beside the plain-torch path it must match (which CPUs run)."""
