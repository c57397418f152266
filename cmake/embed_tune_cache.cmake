# Embeds every tune_cache/*.json into a generated C++ source as a string table, so the binary
# carries the tuned tile configs (autotune/tune_cache.h: the last lookup layer). No file is fine:
# the table is then empty.
file(GLOB TUNE_CACHE_FILES CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/tune_cache/*.json)
list(SORT TUNE_CACHE_FILES)
# The list of names, rewritten only when it changes, so removing a file also re-embeds.
set(TUNE_CACHE_LIST ${CMAKE_BINARY_DIR}/generated/tune_cache_files.txt)
list(JOIN TUNE_CACHE_FILES "\n" TUNE_CACHE_LIST_TEXT)
file(CONFIGURE OUTPUT ${TUNE_CACHE_LIST} CONTENT "${TUNE_CACHE_LIST_TEXT}\n" @ONLY)
set(TUNE_EMBED_OUT ${CMAKE_BINARY_DIR}/generated/embedded_tune_cache.cpp)
add_custom_command(
  OUTPUT ${TUNE_EMBED_OUT}
  COMMAND ${CMAKE_COMMAND} -DOUT=${TUNE_EMBED_OUT} -DSRC_DIR=${CMAKE_SOURCE_DIR}/tune_cache
          -P ${CMAKE_SOURCE_DIR}/cmake/embed_tune_cache_gen.cmake
  DEPENDS ${TUNE_CACHE_FILES} ${TUNE_CACHE_LIST} ${CMAKE_SOURCE_DIR}/cmake/embed_tune_cache_gen.cmake
  COMMENT "Embedding tune caches")
add_library(q35_tune_sources STATIC ${TUNE_EMBED_OUT})
target_include_directories(q35_tune_sources PUBLIC ${CMAKE_SOURCE_DIR})
