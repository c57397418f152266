# Embeds every file under kernel_templates/ into a generated C++ source as a string table,
# so the binary carries its kernel templates. (Q35JIT_KERNEL_DIR at run time may point at the
# folder instead, for editing kernels without rebuilding.)
file(GLOB KERNEL_TEMPLATE_FILES CONFIGURE_DEPENDS
  ${CMAKE_SOURCE_DIR}/kernel_templates/*.cuh ${CMAKE_SOURCE_DIR}/kernel_templates/*.cu)
set(EMBED_OUT ${CMAKE_BINARY_DIR}/generated/embedded_kernels.cpp)
add_custom_command(
  OUTPUT ${EMBED_OUT}
  COMMAND ${CMAKE_COMMAND} -DOUT=${EMBED_OUT} -DSRC_DIR=${CMAKE_SOURCE_DIR}/kernel_templates
          -P ${CMAKE_SOURCE_DIR}/cmake/embed_kernels_gen.cmake
  DEPENDS ${KERNEL_TEMPLATE_FILES} ${CMAKE_SOURCE_DIR}/cmake/embed_kernels_gen.cmake
  COMMENT "Embedding kernel templates")
add_library(q35_kernel_sources STATIC ${EMBED_OUT})
target_include_directories(q35_kernel_sources PUBLIC ${CMAKE_SOURCE_DIR})
