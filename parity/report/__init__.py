"""Result objects and their renderings: terminal, HTML, Markdown, JUnit, Model Explorer."""
