"""Reports rendered: report (terminal tables, Markdown, JSON) and the self-contained HTML pages (html_*).
"""
