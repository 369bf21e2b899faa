"""Streamlit helpers shared by the dashboard's pages (the pages themselves stay thin)."""
