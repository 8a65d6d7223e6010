"""mtp-migrate: LibCST codemods that move MTP training loops onto weighted_mtp.utils."""
