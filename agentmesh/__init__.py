"""AgentMesh composition root: settings, the `agentmesh` CLI, wiring, the local stack."""
