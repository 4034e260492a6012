"""The ahead-of-time compiler: importers -> IR -> passes -> partition -> memory plan -> codegen -> .frt."""
