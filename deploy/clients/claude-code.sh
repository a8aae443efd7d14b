#!/bin/sh
# Adds ipc-mesh to Claude Code for all your projects (user scope), registered as "claude".
# Use another name per concurrent session (e.g. claude-frontend), or drop the --env to let
# the model call `register` itself.
claude mcp add --scope user --transport stdio --env IPC_MESH_AGENT=claude ipc-mesh -- ipc-mesh mcp

# Optional: receive messages as they arrive (channels research preview; see docs/mcp.md):
#   claude mcp add --scope user --transport stdio --env IPC_MESH_AGENT=claude \
#     --env IPC_MESH_CHANNEL=always --env IPC_MESH_MCP_ERA=legacy ipc-mesh -- ipc-mesh mcp
#   claude --dangerously-load-development-channels server:ipc-mesh
