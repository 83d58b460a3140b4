# Finds PCRE2's 8-bit library (GPT-2's pre-tokenizer regex needs Unicode classes). Defines
# PCRE2::pcre2-8. Looks in CMAKE_PREFIX_PATH / PCRE2_ROOT first (the GPU machine gets the Debian
# package unpacked into a carried folder), then the system.
find_path(PCRE2_INCLUDE_DIR pcre2.h HINTS ${PCRE2_ROOT} ENV PCRE2_ROOT PATH_SUFFIXES include)
find_library(PCRE2_LIBRARY NAMES pcre2-8 libpcre2-8.so.0 HINTS ${PCRE2_ROOT} ENV PCRE2_ROOT
             PATH_SUFFIXES lib lib/x86_64-linux-gnu)
include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(PCRE2 REQUIRED_VARS PCRE2_LIBRARY PCRE2_INCLUDE_DIR)
if(PCRE2_FOUND AND NOT TARGET PCRE2::pcre2-8)
  add_library(PCRE2::pcre2-8 UNKNOWN IMPORTED)
  set_target_properties(PCRE2::pcre2-8 PROPERTIES
    IMPORTED_LOCATION "${PCRE2_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${PCRE2_INCLUDE_DIR}"
    INTERFACE_COMPILE_DEFINITIONS "PCRE2_CODE_UNIT_WIDTH=8")
endif()
mark_as_advanced(PCRE2_INCLUDE_DIR PCRE2_LIBRARY)
