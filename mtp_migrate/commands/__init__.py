"""LibCST codemod commands, one per file; ``RewriteMTPLoopCommand`` runs the others in order."""
