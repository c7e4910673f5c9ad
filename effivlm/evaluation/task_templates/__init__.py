"""Task YAML templates and the document functions of the effivlm synthetic tasks."""
